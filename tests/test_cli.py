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
    (tmp_path / "data.jsonl").write_text('{"instruction": "Name a colour.", "output": "Blue."}\n')
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


def test_traceback_shows_the_traceback_and_keeps_exit_code_2(tmp_path):
    result = finetune("validate", str(tmp_path / "missing.yaml"), "--traceback")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert "ConfigError" in result.stderr
    assert result.stderr.strip().endswith("missing.yaml: file: not found; check the path")


def test_debug_outside_preprocess_points_to_traceback(tmp_path):
    result = finetune("validate", str(tmp_path / "missing.yaml"), "--debug")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "belongs to `finetune preprocess CONFIG --debug`" in result.stderr
    assert "--traceback" in result.stderr


def test_axolotl_config_validates_and_notes_the_machine():
    result = finetune("validate", "tests/fixtures/axolotl_qlora_1b.yml")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    # loss_watchdog_* are implemented; the Hub dataset is only fetched by preprocess.
    assert warnings == [
        "warning: datasets[0].path: teknium/GPT4-LLM-Cleaned is not a local file or folder; "
        "preprocess will load it from the Hugging Face Hub"
    ]
    assert "note (this machine): attn_implementation: flash_attention_2 needs a CUDA GPU" in (
        result.stderr
    )


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


def test_readme_generated_tables_are_current():
    from finetune.config.reference import GENERATED

    readme = (ROOT / "README.md").read_text()
    for start, end, render in GENERATED:
        current = readme[readme.index(start) : readme.index(end) + len(end)]
        assert current == render(), "README is stale: run `python -m finetune.config.reference`"


def test_every_key_has_its_axolotl_semantics_written_down():
    from finetune.config.axolotl import DATASET_SEMANTICS, SEMANTICS
    from finetune.config.schema import DatasetConfig, FinetuneConfig

    assert set(SEMANTICS) == set(FinetuneConfig.model_fields)
    assert set(DATASET_SEMANTICS) == set(DatasetConfig.model_fields)


def test_short_help_and_version():
    result = finetune("validate", "-h")
    assert result.returncode == 0 and "Usage" in result.stdout
    from finetune import __version__

    assert finetune("--version").stdout.strip() == f"finetune {__version__}"


def test_every_option_of_every_verb_says_what_it_does():
    import typer.main

    from finetune.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help and "[default" not in param.help, (name, param.name)


def test_one_sample_is_singular(tmp_path):
    from finetune.data.summary import format_summary

    stats = {
        "rows": 1,
        "tokens": 9,
        "trainable_tokens": 3,
        "length_min": 9,
        "length_median": 9,
        "length_p95": 9,
        "length_max": 9,
    }
    summary = {
        "rows_read": 1,
        "rows_kept": 1,
        "dropped_too_long": 0,
        "dropped_nothing_to_train": 0,
        "truncated": 0,
        "chunks_added": 0,
        "train": stats,
        "eval": {"rows": 0},
        "cache": "x",
    }
    assert "train: 1 sample, 9 tokens" in format_summary(summary)
