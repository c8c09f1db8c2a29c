"""`--merged` checks the merged model against base + adapter and catches a corrupted merge;
`--gguf` checks an exported file, read back by transformers' GGUF reader, against the
fine-tuned model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.errors import EvaluationError
from finetune.evaluate import evaluate_run
from finetune.export import export_model
from finetune.runfolder import read_record, run_config

ROOT = Path(__file__).parents[2]
QUIET = {"log": lambda message: None}


def evaluate(tiny_run, run_dir: Path | None = None, **options):
    run_dir = run_dir or tiny_run.run_dir
    config = run_config(tiny_run.loaded("--output-dir", str(run_dir)), run_dir)
    return evaluate_run(config, run_dir, read_record(run_dir), **options, **QUIET)


def corrupted_copy(tiny_run, folder: Path) -> Path:
    """A copy of the run whose merged model has one weight tensor replaced by noise."""
    copy = folder / "run"
    shutil.copytree(tiny_run.run_dir, copy)
    weights = copy / "merged" / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, weights, metadata={"format": "pt"})
    return copy


def test_the_merged_model_agrees_with_base_plus_adapter(tiny_run):
    adapter = evaluate(tiny_run)
    merged = evaluate(tiny_run, merged=True)
    agreement = merged.merged
    assert agreement.ok
    assert agreement.same_answers == agreement.answers == 8
    assert agreement.max_logit_diff <= agreement.allowed_logit_diff
    assert merged.finetuned.model == "merged"
    assert merged.finetuned.loss == pytest.approx(adapter.finetuned.loss, rel=1e-4)
    assert merged.base.loss == pytest.approx(adapter.base.loss, rel=1e-6)


def test_a_corrupted_merge_fails_the_command(tiny_run, tmp_path):
    copy = corrupted_copy(tiny_run, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "eval", str(tiny_run.config_path), "--merged"]
        + ["--output-dir", str(copy)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "the merged model does not compute what base + adapter computes" in result.stderr
    assert "merged model vs base + adapter:" in result.stdout and "FAILED" in result.stdout
    saved = json.loads((copy / "eval.json").read_text())
    assert saved["merged_agreement"]["ok"] is False
    assert (
        saved["merged_agreement"]["max_logit_diff"]
        > saved["merged_agreement"]["allowed_logit_diff"]
    )


def test_an_exported_gguf_is_checked_against_the_fine_tuned_model(tiny_run, tmp_path):
    config = run_config(tiny_run.loaded(), tiny_run.run_dir)
    exported = export_model(
        config, tiny_run.run_dir, quant="f32", output_dir=tmp_path / "good", **QUIET
    ).gguf_file
    report = evaluate(tiny_run, merged=True, gguf=exported)
    assert report.gguf.ok
    assert report.gguf.same_answers == report.gguf.answers == 8
    assert report.gguf.tokenizer_mismatches == 0
    assert report.gguf.max_logit_diff < 1e-3  # f32: the same weights

    # The GGUF of a corrupted merge answers otherwise, and the check says so.
    copy = corrupted_copy(tiny_run, tmp_path)
    bad = export_model(config, copy, quant="f32", output_dir=tmp_path / "bad", **QUIET).gguf_file
    with pytest.raises(EvaluationError, match="greedy answers differ"):
        evaluate(tiny_run, gguf=bad)
