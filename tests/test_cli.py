"""The command line as a user runs it: real subprocesses, exit codes, stdout and stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
VERBS = ["validate", "preprocess", "train", "merge", "inference"]


def finetune(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n"
        "datasets:\n  - path: data.jsonl\n    type: alpaca\n"
        "learning_rate: 3.0e-4\n"
    )
    return path


def test_help_lists_every_verb():
    result = finetune("--help")
    assert result.returncode == 0
    for verb in VERBS:
        assert verb in result.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb):
    result = finetune(verb, "--help")
    assert result.returncode == 0
    assert "CONFIG" in result.stdout.upper()


def test_validate_prints_resolved_config_with_overrides(config_file):
    result = finetune("validate", str(config_file), "--learning-rate", "1e-4", "--max-steps=5")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["learning_rate"] == 1e-4
    assert resolved["max_steps"] == 5
    assert resolved["lora_r"] == 8  # a default, filled in
    assert resolved["bf16"] in (True, False)  # `auto` resolved for this machine
    assert "# --- adapter ---" in result.stdout


def test_validate_reports_every_problem_and_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "base_model: x\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n"
        "lora_alhpa: 16\nlora_r: 0\nadapter: qlora\n"
    )
    result = finetune("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert f"{path}: lora_alhpa: unknown key; did you mean 'lora_alpha'?" in lines
    assert any(line.startswith(f"{path}: lora_r: ") for line in lines)
    assert any(line.startswith(f"{path}: adapter: qlora needs") for line in lines)


def test_yaml_syntax_error_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("base_model: x\ndatasets: [\n")
    result = finetune("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "line 3, column 1: invalid YAML" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = finetune("validate", str(tmp_path / "missing.yaml"), "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "ConfigError" in result.stderr


def test_axolotl_config_warns_once_and_notes_the_machine():
    result = finetune("validate", "tests/fixtures/axolotl_qlora_1b.yml")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: ignored Axolotl keys (finetune does not implement them): "
        "loss_watchdog_threshold, loss_watchdog_patience"
    ]


def test_schema_is_json_schema():
    result = finetune("validate", "--schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["properties"]["lora_alpha"]["description"]
    assert "base_model" in schema["required"]


def test_validate_without_config_is_a_usage_error():
    result = finetune("validate")
    assert result.returncode == 2
    assert "CONFIG" in result.stderr


def test_readme_config_reference_is_current():
    from finetune.config.reference import END, START, config_reference

    readme = (ROOT / "README.md").read_text()
    current = readme[readme.index(START) : readme.index(END) + len(END)]
    assert current == config_reference(), (
        "README is stale: run `python -m finetune.config.reference`"
    )
