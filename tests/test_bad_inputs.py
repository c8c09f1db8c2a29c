"""The bad-input corpus (tests/bad_inputs/*.yaml): every case exits with code 2, prints a
message naming the culprit, shows no traceback, and writes nothing.

A case gives the command, the files to create (text, or bytes via YAML's !!binary), folders
to copy in (`copy`), and the words its message must contain (`expect`). `{tiny_model}` and
the adapter placeholders are filled in here. Most cases run in-process through the CLI's
entry point (fast); `subprocess: true` cases run as a real process (for environment variables
read at import time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*.yaml"))


@pytest.fixture(scope="session")
def placeholders(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """A LoRA adapter for the tiny model, one for another model, and one whose config lies."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    model.save_pretrained(root / "adapter")

    torch.manual_seed(1)
    other = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    get_peft_model(LlamaForCausalLM(other), lora).save_pretrained(root / "other_adapter")

    shutil.copytree(root / "adapter", root / "rank_mismatch_adapter")
    config_file = root / "rank_mismatch_adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 8
    config_file.write_text(json.dumps(config))
    return {
        "tiny_model": str(tiny_model_dir),
        "adapter": str(root / "adapter"),
        "other_adapter": str(root / "other_adapter"),
        "rank_mismatch_adapter": str(root / "rank_mismatch_adapter"),
    }


def snapshot(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1)
        for p in folder.rglob("*")
    }


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, capsys, placeholders):
    spec = yaml.safe_load(case.read_text())
    for name, content in spec.get("files", {}).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{tiny_model}", placeholders["tiny_model"]))
    for name, source in spec.get("copy", {}).items():
        shutil.copytree(source.format(**placeholders), tmp_path / name, dirs_exist_ok=True)
    before = snapshot(tmp_path)

    if spec.get("subprocess"):
        env = {**os.environ, **spec.get("env", {})}
        result = subprocess.run(
            [sys.executable, "-m", "finetune", *spec["command"]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        code, stderr = result.returncode, result.stderr
    else:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exited:
            main(list(spec["command"]))
        code, stderr = exited.value.code, capsys.readouterr().err

    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert spec["expect"] in stderr, stderr
    assert snapshot(tmp_path) == before, "the failed command wrote files"
