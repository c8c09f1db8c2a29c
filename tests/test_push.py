"""`finetune push`: what goes up, and where, from the run folder alone; offline or without a
network it refuses at once, naming the cause, and nothing is uploaded. (No test here reaches the
Hub: the machines that run these tests have no access to it.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.config import load_config
from finetune.errors import PushError
from finetune.push import plan_push
from finetune.runfolder import new_record, write_record

ROOT = Path(__file__).parents[1]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A config and a run folder with what train, merge and export leave behind."""
    out = tmp_path / "out"
    files = [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "eval.json",
        "checkpoint-2/adapter_model.safetensors",
        "checkpoint-10/adapter_model.safetensors",
        "merged/config.json",
        "merged/model.safetensors",
        "export/out-q8_0.gguf",
        "export/Modelfile",
        ".adapter_model.safetensors.tmp-host-1-abc/x",
    ]
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    config = {
        "base_model": str(tmp_path / "base"),
        "datasets": [{"path": str(tmp_path / "data.jsonl"), "type": "alpaca"}],
        "output_dir": str(out),
        "hub_model_id": "someone/varnholm-facts",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    # The record train writes, so later verbs read the run's own config (as they do for real).
    write_record(out, new_record(load_config(tmp_path / "run.yaml").config))
    return tmp_path


def plan(run: Path, what: str = "adapter", *overrides: str):
    config = load_config(run / "run.yaml", list(overrides)).config
    return plan_push(config, run / "out", what)


def test_adapter_push_takes_the_run_without_other_stages_outputs(run):
    pushed = plan(run)
    assert pushed.repo_id == "someone/varnholm-facts"
    assert pushed.folder == run / "out"
    assert pushed.files == sorted(
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "config.yaml",
            "eval.json",
            "metrics.jsonl",
            "run.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    assert pushed.private is None


def test_hub_strategy_decides_the_checkpoints(run):
    newest = plan(run, "adapter", "--hub-strategy", "checkpoint").files
    assert [f for f in newest if f.startswith("checkpoint-")] == [
        "checkpoint-10/adapter_model.safetensors"
    ]
    every = plan(run, "adapter", "--hub-strategy", "all_checkpoints").files
    assert {f.split("/")[0] for f in every if f.startswith("checkpoint-")} == {
        "checkpoint-2",
        "checkpoint-10",
    }


def test_merged_and_gguf_pushes_take_their_folders(run):
    merged = plan(run, "merged", "--hub-model-id", "someone/varnholm-merged")
    assert merged.repo_id == "someone/varnholm-merged"
    assert (merged.folder, merged.files) == (
        run / "out" / "merged",
        ["config.json", "model.safetensors"],
    )
    gguf = plan(run, "gguf", "--hub-private-repo")
    assert (gguf.files, gguf.private) == (["Modelfile", "out-q8_0.gguf"], True)


@pytest.mark.parametrize(
    ("what", "remove", "message"),
    [
        ("merged", "merged", "merge first (finetune merge CONFIG)"),
        ("gguf", "export", "export first (finetune export CONFIG --format gguf)"),
        ("adapter", "adapter_model.safetensors", "train first (finetune train CONFIG)"),
    ],
)
def test_a_missing_stage_output_names_the_verb_to_run(run, what, remove, message):
    target = run / "out" / remove
    if target.is_dir():
        for path in sorted(target.rglob("*"), reverse=True):
            path.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(PushError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(run, what)


def test_without_hub_model_id_it_says_where_to_set_it(run):
    config = load_config(run / "run.yaml").config.model_copy(update={"hub_model_id": None})
    with pytest.raises(PushError, match="hub_model_id is not set"):
        plan_push(config, run / "out")


def push(run: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run(
        [sys.executable, "-m", "finetune", "push", str(run / "run.yaml"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**environment, **env},
    )


def test_offline_it_refuses_before_any_request(run):
    result = push(run, "--what", "merged", HF_HUB_OFFLINE="1", HF_TOKEN="hf_unused")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("HF_HUB_OFFLINE is set, so nothing can be uploaded")


def test_without_a_network_it_fails_fast_and_uploads_nothing(run):
    # A closed local port stands in for an unreachable Hub.
    result = push(run, HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_unused")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("cannot reach the Hugging Face Hub (")
    assert "nothing was uploaded" in result.stderr
    assert "pushing" not in result.stdout


def test_dry_run_lists_the_files(run):
    result = push(run, "--what", "gguf", "--dry-run", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"would push to someone/varnholm-facts from {run / 'out' / 'export'}:",
        "  Modelfile",
        "  out-q8_0.gguf",
    ]
