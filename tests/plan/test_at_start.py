"""`train`'s memory plan at its start: the same memory as `finetune plan`, a warning with the
one change that fits when it does not, and skipped (saying so) when the run is too short for
the plan to pay."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from finetune.model.load import load_model_config
from finetune.plan import make_plan
from finetune.plan.at_start import PLAN_SHARE, plan_at_start, plan_cost_share, run_tokens

sys.path.insert(0, str(Path(__file__).parent))
from test_plan import plan_config, write_yaml  # noqa: E402


@pytest.fixture(scope="module")
def six_layer_model(tmp_path_factory, save_tiny_llama):
    return save_tiny_llama(tmp_path_factory.mktemp("six-layers"), num_hidden_layers=6)


def test_the_memory_only_plan_is_the_full_plans_memory(tmp_path, six_layer_model):
    config = plan_config(tmp_path, six_layer_model, micro_batch_size=2)
    full = make_plan(config, log=lambda message: None)
    quick = make_plan(config, log=lambda message: None, memory_only=True)
    expected = asdict(full.breakdown)
    got = asdict(quick.breakdown)
    assert got.pop("runtime") > 0 and expected.pop("runtime") > 0  # the process, read twice
    assert got == expected
    assert quick.seconds_per_epoch is None and full.seconds_per_step > 0


def test_a_run_that_will_not_fit_is_warned_with_the_change_that_fits(tmp_path, six_layer_model):
    config = plan_config(tmp_path, six_layer_model, sequence_len=1024, micro_batch_size=4)
    plan = make_plan(config, log=lambda message: None, memory_only=True)
    budget = plan.peak_memory_bytes - plan.breakdown.activations // 2
    lines: list[str] = []
    plan_at_start(config, [1000] * 8, lines.append, choice=True, budget_bytes=budget)
    assert lines[0].startswith("plan: peak ") and "does NOT fit" in lines[0]
    assert lines[1].startswith("warning: the plan says this run needs")
    assert "it fits with " in lines[1] and "may run out of memory" in lines[1]

    lines.clear()
    plan_at_start(config, [1000] * 8, lines.append, choice=True, budget_bytes=10 * budget)
    assert len(lines) == 1 and lines[0].startswith("plan: peak ") and ", fits " in lines[0]


def test_the_plan_runs_for_a_long_run_and_is_skipped_for_a_short_one(tmp_path, six_layer_model):
    config = plan_config(tmp_path, six_layer_model)
    model_config = load_model_config(config)
    # the share falls as the run grows: the plan's steps are fixed, the run's are not
    short, long = [200] * 4, [200] * 4000
    assert plan_cost_share(config, model_config, run_tokens(config, short)) > PLAN_SHARE
    assert plan_cost_share(config, model_config, run_tokens(config, long)) < PLAN_SHARE

    said: list[str] = []
    plan_at_start(config, short, said.append)
    assert len(said) == 1 and said[0].startswith("plan: skipped, this run is short")
    said.clear()
    plan_at_start(config, long, said.append)
    assert len(said) == 1 and said[0].startswith("plan: peak ")
    said.clear()
    plan_at_start(config, long, said.append, choice=False)
    assert said == []
    # max_steps caps the run's tokens whatever the data holds
    capped = config.model_copy(update={"max_steps": 2})
    assert run_tokens(capped, long) == 2 * config.micro_batch_size * config.sequence_len


def test_train_prints_the_plan_before_loading_the_model(tmp_path, six_layer_model):
    config = write_yaml(tmp_path, six_layer_model)
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "train", str(config), "--plan", "--max-steps=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).splitlines()
    plan = next(i for i, line in enumerate(lines) if line.startswith("plan: peak "))
    attention = next(i for i, line in enumerate(lines) if line.startswith("attention: "))
    assert plan < attention  # said before the model loads
    assert "done: 1 steps" in done.stdout


def test_a_plan_that_fails_says_so_and_the_run_goes_on(tmp_path, six_layer_model, monkeypatch):
    import finetune.plan.estimate as estimate

    def broken(*args, **kwargs):
        raise RuntimeError("no shortened copy of this model")

    monkeypatch.setattr(estimate, "make_plan", broken)
    said: list[str] = []
    plan_at_start(plan_config(tmp_path, six_layer_model), [200], said.append, choice=True)
    assert said == [
        "plan: could not plan this run (no shortened copy of this model); training goes on "
        "without it"
    ]
