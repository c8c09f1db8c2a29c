"""Interruptions lose nothing: SIGKILL and SIGTERM mid-training, half-written checkpoints, and
two preprocess runs on the same cache at once."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from finetune.train.checkpoints import complete_checkpoints

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "data" / "samples"


def write_config(folder: Path, model_dir: Path, **options) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = {
        "base_model": str(model_dir),
        "datasets": [
            {"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"},
            {"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"},
        ],
        "adapter": "lora",
        "lora_target_linear": True,
        "lora_dropout": 0.1,  # resuming must restore the RNG too
        "micro_batch_size": 1,
        "max_steps": 14,
        "save_steps": 2,
        "learning_rate": 5e-3,
        "bf16": False,
        "output_dir": str(folder / "out"),
        "dataset_prepared_path": str(folder / "prepared"),
        **options,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=cwd
    )


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def logged_steps(output: Path) -> list[int]:
    path = output / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = (
        load_file(a / "adapter_model.safetensors"),
        load_file(b / "adapter_model.safetensors"),
    )
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-6, msg=key)


def test_sigkill_at_any_moment_then_resume_gives_the_same_adapter(tmp_path, tiny_model_dir):
    reference = write_config(tmp_path / "reference", tiny_model_dir)
    assert finetune("train", str(reference), cwd=tmp_path).returncode == 0

    moments = {
        # The folder of checkpoint-6 has just appeared: its files are being written.
        "while writing a checkpoint": lambda out: (out / "checkpoint-6").exists(),
        # Checkpoint-8 is complete and step 9 has been logged: between two checkpoints.
        "between checkpoints": lambda out: 9 in logged_steps(out),
    }
    for name, moment in moments.items():
        folder = tmp_path / name.replace(" ", "_")
        config = write_config(folder, tiny_model_dir)
        output = folder / "out"
        run = start("train", str(config), cwd=folder)
        wait_for(lambda m=moment, o=output, r=run: m(o) or r.poll() is not None)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert run.returncode == -signal.SIGKILL, f"{name}: training ended before the kill"

        resumed = finetune("train", str(config), "--resume", cwd=folder)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_adapter(tmp_path / "reference" / "out", output)
        assert logged_steps(output) == list(range(1, 15)), name


def test_half_written_checkpoint_is_never_loaded(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, max_steps=4)
    assert finetune("train", str(config), cwd=tmp_path).returncode == 0
    output = tmp_path / "out"
    good = complete_checkpoints(output)[-1]
    torn = output / "checkpoint-99"
    shutil.copytree(good, torn)
    (torn / "trainer_state.json").write_text('{"global_step": 99, "log_hist')  # cut off
    assert complete_checkpoints(output)[-1] == good


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, max_steps=400, save_steps=1000)
    output = tmp_path / "out"
    run = start("train", str(config), cwd=tmp_path)
    wait_for(lambda: len(logged_steps(output)) >= 3 or run.poll() is not None)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "continue with `finetune train CONFIG --resume`" in stdout + stderr
    assert "Traceback" not in stderr
    checkpoints = complete_checkpoints(output)
    assert checkpoints, "no checkpoint saved on SIGTERM"
    step = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["global_step"]
    assert step >= 3


def test_two_preprocess_runs_at_once_share_one_valid_cache(tmp_path, smollm2_dir):
    sys.path.insert(0, str(ROOT / "bench"))
    from make_data import chat_rows, write_jsonl

    data = write_jsonl(chat_rows(3000, 150, seed=1), tmp_path / "chat.jsonl")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(smollm2_dir),
                "datasets": [{"path": str(data), "type": "chat_template"}],
                "dataset_prepared_path": str(tmp_path / "prepared"),
                "sequence_len": 2048,  # every generated conversation fits
            }
        )
    )
    runs = [start("preprocess", str(config), cwd=tmp_path) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    caches = [p for p in (tmp_path / "prepared").iterdir() if p.is_dir()]
    assert len(caches) == 1
    assert sum("Using the prepared data" in out for out, _ in outputs) == 1
    summary = json.loads((caches[0] / "summary.json").read_text())
    assert summary["rows_kept"] == 3000

    import datasets

    assert len(datasets.load_from_disk(str(caches[0] / "train"))) == 3000
