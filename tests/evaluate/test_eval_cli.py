"""`finetune eval` as a user runs it: the table, eval.json, --show, --max-samples, and the
one-line refusals (no lm-evaluation-harness, no adapter)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def finetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_eval_prints_the_table_and_writes_eval_json(tiny_run):
    result = finetune(
        "eval",
        str(tiny_run.config_path),
        "--data",
        str(tiny_run.heldout),
        "--max-samples",
        "4",
        "--show",
        "2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert f"held-out data: {tiny_run.heldout} (chat_template): 4 samples" in out
    for row in ("loss", "perplexity", "exact match", "contains", "token F1"):
        assert any(line.startswith(row + " ") for line in out.splitlines()), row
    assert "worst regressions" in out and "best gains:" in out
    saved = json.loads((tiny_run.run_dir / "eval.json").read_text())
    assert saved["samples"] == 4 and len(saved["answers"]) == 4
    assert saved["finetuned"]["loss"] < saved["base"]["loss"]
    # The table's loss is eval.json's, to the printed digits.
    loss_line = next(line for line in out.splitlines() if line.startswith("loss "))
    assert loss_line.split()[1] == f"{saved['base']['loss']:.4f}"


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval installed")
def test_lm_eval_without_the_package_says_what_to_install(tiny_run):
    result = finetune("eval", str(tiny_run.config_path), "--lm-eval", "arc_easy,hellaswag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "lm-evaluation-harness" in message and "pip install 'finetune[eval]'" in message
    assert "loading" not in result.stdout  # refused before any model loaded


def test_a_folder_without_an_adapter_is_refused(tiny_run, tmp_path):
    result = finetune("eval", str(tiny_run.config_path), "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"{tmp_path}: no trained adapter there (adapter_config.json); train first "
        "(finetune train CONFIG), or point output_dir at the run"
    )
