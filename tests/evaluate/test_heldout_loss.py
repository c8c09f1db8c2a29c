"""The held-out loss is the token-weighted mean cross-entropy over trained tokens: checked
against a hand computation on peft's own base + adapter (full logits, one sample at a time), and
against the eval_loss training itself logged for the same split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from finetune.evaluate import evaluate_run
from finetune.evaluate.samples import eval_samples, held_out_data
from finetune.runfolder import read_record, run_config


def reference_loss(model, samples) -> float:
    """Sum over samples of the trained tokens' cross-entropy, divided by their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            logits = model(input_ids=torch.tensor([sample.input_ids])).logits[0, :-1].float()
            targets = torch.tensor(sample.labels[1:])
            keep = targets != -100
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    loaded = tiny_run.loaded()
    config = run_config(loaded, tiny_run.run_dir)
    record = read_record(tiny_run.run_dir)
    report = evaluate_run(config, tiny_run.run_dir, record, log=lambda message: None)
    rows = held_out_data(config, log=lambda message: None).rows
    return report, eval_samples(rows, stop_ids=[2])


def test_base_and_fine_tuned_losses_match_a_hand_computation(evaluated, tiny_model_dir, tiny_run):
    report, samples = evaluated
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    expected_base = reference_loss(base, samples)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        tiny_run.run_dir,
    ).eval()
    expected_tuned = reference_loss(tuned, samples)

    assert report.base.loss == pytest.approx(expected_base, rel=1e-5)
    assert report.finetuned.loss == pytest.approx(expected_tuned, rel=1e-5)
    assert report.finetuned.loss < report.base.loss - 0.05  # three big steps on these facts
    assert report.base.perplexity == pytest.approx(math.exp(expected_base), rel=1e-5)
    assert report.tokens == sum(sum(label != -100 for label in s.labels[1:]) for s in samples)


def test_fine_tuned_loss_is_the_eval_loss_training_reported(evaluated, tiny_run):
    report, _ = evaluated
    records = [
        json.loads(line) for line in (tiny_run.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    final = [r for r in records if "eval_loss" in r and r["step"] == records[-1]["step"]]
    assert final, "training evaluated at its last step"
    assert report.finetuned.loss == pytest.approx(final[-1]["eval_loss"], rel=1e-4)


def test_eval_json_holds_both_models(evaluated, tiny_run):
    report, _ = evaluated
    saved = json.loads((Path(tiny_run.run_dir) / "eval.json").read_text())
    for key in ("base", "finetuned"):
        for metric in ("loss", "perplexity", "exact_match", "contains", "token_f1"):
            assert saved[key][metric] == pytest.approx(getattr(getattr(report, key), metric))
    assert saved["samples"] == 8
    assert not [p for p in Path(tiny_run.run_dir).iterdir() if p.name.startswith(".eval.json")]
