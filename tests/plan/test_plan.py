"""`finetune plan`: what it predicts from 1- and 2-layer steps must be what the whole model
measures (the tensors of a real step of the full-depth model are the reference), the tensor
counter must count what is allocated, and the verb must answer as a command does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from finetune.config import FinetuneConfig
from finetune.machine import resolve_for_machine
from finetune.model.load import load_model_config
from finetune.plan import make_plan
from finetune.plan.measure import LiveTensorBytes, measure_step

SAMPLES = Path(__file__).parents[2] / "data" / "samples"


@pytest.fixture(scope="module")
def six_layer_model(tmp_path_factory, save_tiny_llama):
    return save_tiny_llama(tmp_path_factory.mktemp("six-layers"), num_hidden_layers=6)


def config_values(tmp_path: Path, model_dir: Path, **options) -> dict:
    return {
        "base_model": str(model_dir),
        "datasets": [{"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"}],
        "adapter": "lora",
        "lora_target_linear": True,
        "sequence_len": 256,
        "sample_packing": True,
        "micro_batch_size": 1,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
        **options,
    }


def plan_config(tmp_path: Path, model_dir: Path, **options) -> FinetuneConfig:
    return resolve_for_machine(FinetuneConfig(**config_values(tmp_path, model_dir, **options)))


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_checkpointing": True}, {"peft_use_dora": True}, {"micro_batch_size": 2}],
    ids=["lora", "checkpointing", "dora", "two-rows"],
)
def test_the_plan_predicts_the_whole_models_step(tmp_path, six_layer_model, options):
    config = plan_config(tmp_path, six_layer_model, **options)
    plan = make_plan(config, log=lambda message: None)
    tokens = config.micro_batch_size * config.sequence_len
    whole = measure_step(
        config, load_model_config(config), 6, tokens, packed=bool(config.sample_packing)
    )
    part = plan.breakdown
    predicted = part.weights + part.adapter + part.gradients + part.optimizer + part.activations
    assert part.weights + part.adapter == whole.weight_bytes
    assert predicted == pytest.approx(whole.peak_bytes, rel=0.02)
    assert plan.fits  # a 6-layer model of width 64 on a 24 GB machine


def test_the_counter_counts_what_is_allocated_and_freed():
    counter = LiveTensorBytes()
    with counter:
        kept = [torch.zeros(1000, 250) for _ in range(4)]  # 4 x 1 MB
        assert counter.current == 4_000_000
        doubled = [tensor * 2 for tensor in kept]
        assert counter.current == 8_000_000
        del doubled
        assert counter.current == 4_000_000
        leaf = torch.ones(500, 500, requires_grad=True)  # 1 MB
        out = (leaf * 3).sin()  # sin keeps its input (1 MB) for the backward
        assert counter.current == 4_000_000 + 3 * 1_000_000
        out.sum().backward()
    assert counter.peak >= 7_000_000
    assert leaf.grad is not None and len(kept) == 4


def run_plan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", "plan", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def write_yaml(tmp_path: Path, model_dir: Path, **options) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_values(tmp_path, model_dir, **options)))
    return path


def test_plan_json_for_gpus_and_the_prepared_data(tmp_path, six_layer_model):
    config = write_yaml(tmp_path, six_layer_model)
    before = run_plan(str(config), "--json", cwd=tmp_path)
    assert before.returncode == 0, before.stderr[-2000:]
    plan = json.loads(before.stdout)
    assert plan["tokens_per_epoch"] is None and "finetune preprocess" in " ".join(plan["notes"])
    prepared = subprocess.run(
        [sys.executable, "-m", "finetune", "preprocess", str(config)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    result = run_plan(str(config), "--json", "--gpu", "A100-40GB", "--num-gpus", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["device"] == "2 x A100-40GB (40 GiB each)"
    assert plan["fits"] is True
    assert plan["peak_memory_bytes"] == sum(plan["breakdown"].values())
    assert plan["tokens_per_epoch"] > 0 and plan["steps_per_epoch"] > 0
    assert plan["seconds_per_epoch"] > 0
    assert "assumed utilization" in plan["time_basis"]


def test_a_run_that_does_not_fit_gets_the_one_change_that_fits(tmp_path, six_layer_model):
    config = plan_config(tmp_path, six_layer_model, sequence_len=1024, micro_batch_size=4)
    plan = make_plan(config, log=lambda message: None)
    activations = plan.breakdown.activations
    # A budget the run misses by its activations: halving the batch (or checkpointing) fits.
    plan_small = make_plan(
        config, log=lambda message: None, budget_bytes=plan.peak_memory_bytes - activations // 2
    )
    assert not plan_small.fits
    assert plan_small.suggestion.startswith(("gradient_checkpointing: true", "micro_batch_size"))


def test_an_unknown_gpu_is_a_clear_error(tmp_path, six_layer_model):
    config = write_yaml(tmp_path, six_layer_model)
    result = run_plan(str(config), "--gpu", "GTX-Imaginary", cwd=tmp_path)
    assert result.returncode == 2
    assert "--gpu GTX-Imaginary: not a GPU the planner knows; one of H200" in result.stderr
    assert "Traceback" not in result.stderr


def test_step_time_scales_the_counted_flops_even_when_timings_are_noisy():
    """A busy machine can time the 2-layer step faster than the 1-layer one; scaling seconds
    directly then gave a negative layer time (clamped: "0 s per epoch"). The FLOPs are counted
    exactly; the measured steps only give the rate."""
    from finetune.plan.measure import StepMeasure
    from finetune.plan.scaling import Model

    def step(layers: int, tokens: int, seconds: float) -> StepMeasure:
        flops = 10**9 * tokens * (1 + layers)  # 1 GFLOP per token outside, 1 per layer
        return StepMeasure(layers, tokens, 0, 0, 0, 0, 0, seconds, flops)

    # the three steps: 2, 4 and 6 x 512 GFLOPs, timed at 1.0, 2.2 and 2.0 s (the last noisy)
    model = Model(30, 64, 4, step(1, 512, 1.0), step(1, 1024, 2.2), step(2, 1024, 2.0))
    rate = (2 + 4 + 6) * 512e9 / 5.2  # FLOPs per second over the three steps
    assert model.seconds(4096) == pytest.approx(4096 * 31e9 / rate)
