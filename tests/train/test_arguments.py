"""TrainingArguments as Axolotl derives them: warm-up, the cosine floor, early stopping's saves."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_scheduler

from finetune.config import FinetuneConfig
from finetune.train.arguments import evaluation_and_saving, learning_rate_schedule, warmup_steps

BASE = {"base_model": "x", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}


def config(**options) -> FinetuneConfig:
    return FinetuneConfig(**{**BASE, **options})


@pytest.mark.parametrize(
    ("options", "total", "expected"),
    [
        ({}, 1000, 30),  # Axolotl: 3% of the steps
        ({}, 10_000, 100),  # ... at most 100
        ({}, 20, 0),
        ({"warmup_ratio": 0.1}, 1000, 100),
        ({"warmup_steps": 7}, 1000, 7),
    ],
)
def test_warmup_defaults_as_axolotl(options, total, expected):
    assert warmup_steps(config(**options), total) == expected


def test_cosine_min_lr_ratio_decays_to_the_floor_on_axolotls_curve():
    peak, ratio, total = 1e-3, 0.1, 100
    schedule = learning_rate_schedule(config(learning_rate=peak, cosine_min_lr_ratio=ratio))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = get_scheduler(
        schedule["lr_scheduler_type"],
        optimizer,
        num_warmup_steps=0,
        num_training_steps=total,
        scheduler_specific_kwargs=schedule["lr_scheduler_kwargs"],
    )
    seen = []
    for _ in range(total):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    for step in (0, 25, 50, 99):
        # Axolotl's get_cosine_schedule_with_min_lr: peak * ((1 - r) * cos_factor + r)
        factor = 0.5 * (1 + math.cos(math.pi * step / total))
        assert seen[step] == pytest.approx(peak * ((1 - ratio) * factor + ratio), rel=1e-6)


def test_early_stopping_keeps_a_save_interval_that_lines_up_with_evaluation():
    notes = []
    schedule = evaluation_and_saving(
        config(val_set_size=0.1, early_stopping_patience=2, eval_steps=10, save_steps=20),
        steps_per_epoch=100,
        has_eval=True,
        log=notes.append,
    )
    assert (schedule["eval_steps"], schedule["save_steps"]) == (10, 20)
    assert schedule["load_best_model_at_end"] and not notes


def test_early_stopping_replaces_a_save_interval_that_does_not_and_says_so():
    notes = []
    schedule = evaluation_and_saving(
        config(val_set_size=0.1, early_stopping_patience=2, eval_steps=10, save_steps=15),
        steps_per_epoch=100,
        has_eval=True,
        log=notes.append,
    )
    assert schedule["save_steps"] == 10
    assert notes == [
        "note: early_stopping_patience: checkpoints are saved at every evaluation (every 10 "
        "steps) so the best one can be restored; save_steps is replaced"
    ]


def test_zero_per_epoch_means_never():
    schedule = evaluation_and_saving(
        config(val_set_size=0.1, evals_per_epoch=0, saves_per_epoch=0),
        steps_per_epoch=10,
        has_eval=True,
        log=print,
    )
    assert (schedule["eval_strategy"], schedule["save_strategy"]) == ("no", "no")
