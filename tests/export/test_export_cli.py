"""`finetune export` as a user runs it: merging first, the path printed last, no overwriting
without --force, K-quants refused with the command to run, and nothing half-written on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from export_runs import ROOT, SAMPLES, make_run, save_base, small_tokenizer, variant_run

from finetune.errors import ExportError
from finetune.export import export_model


def finetune(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path) if path else None
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def unmerged_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run folder as `train` leaves it (no merged/ yet), and its config file."""
    root = tmp_path_factory.mktemp("cli-run")
    base = save_base("qwen2", small_tokenizer("bytelevel"), root / "base")
    make_run(
        base,
        root / "run",
        chat_template=(ROOT / "finetune/data/templates/chatml.jinja").read_text(),
    )
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "datasets": [{"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"}],
                "chat_template": "chatml",
                "output_dir": str(root / "run"),
            }
        )
    )
    return root / "run", config


def test_export_merges_first_and_prints_the_file_last(unmerged_run):
    run, config = unmerged_run
    result = finetune("export", str(config), "--format", "ollama", "--quant", "q8_0")

    assert result.returncode == 0, result.stderr
    gguf_file = run / "export" / "run-q8_0.gguf"
    assert result.stdout.strip().splitlines()[-1] == str(gguf_file)
    assert "merging the adapter first" in result.stdout
    assert (run / "merged" / "config.json").is_file()
    assert gguf_file.read_bytes()[:4] == b"GGUF"
    assert f"FROM ./{gguf_file.name}" in (run / "export" / "Modelfile").read_text()

    again = finetune("export", str(config), "--format", "ollama", "--quant", "q8_0")
    assert again.returncode == 2
    assert "already exist; add --force to replace it" in again.stderr  # GGUF and Modelfile
    assert "Traceback" not in again.stderr
    forced = finetune("export", str(config), "--quant", "q8_0", "--force")
    assert forced.returncode == 0, forced.stderr


def test_k_quant_without_llama_cpp_is_refused_with_the_command(unmerged_run):
    run, config = unmerged_run
    result = finetune(
        "export", str(config), "--quant", "Q4_K_M", path=str(Path(sys.executable).parent)
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "llama-quantize is not on PATH" in result.stderr
    assert (
        f"finetune export CONFIG --quant f16 && llama-quantize {run}/export/run-f16.gguf "
        f"{run}/export/run-q4_k_m.gguf Q4_K_M"
    ) in result.stderr
    assert not (run / "export" / "run-q4_k_m.gguf").exists()


def test_unknown_format_and_quant_are_refused(unmerged_run):
    run, config = unmerged_run
    with pytest.raises(ExportError, match="--quant q3: unknown type; choose one of f32, f16"):
        export_model(yaml_config(config), run, quant="q3")
    with pytest.raises(ExportError, match="--format safetensors: choose one of gguf, ollama"):
        export_model(yaml_config(config), run, fmt="safetensors")


def yaml_config(path: Path):
    from finetune.config import load_config

    return load_config(path, []).config


def stand_in_llama_quantize(folder: Path, script: str) -> str:
    """A stand-in for llama.cpp's `llama-quantize` binary (not installed here): a shell script
    taking its arguments, SOURCE TARGET TYPE. The real quantizer did not run in these tests."""
    folder.mkdir()
    binary = folder / "llama-quantize"
    binary.write_text("#!/bin/sh\n" + script + "\n")
    binary.chmod(0o755)
    return f"{folder}{os.pathsep}/usr/bin{os.pathsep}/bin"


def test_a_failing_quantizer_leaves_nothing_half_written(run_of, tmp_path, monkeypatch):
    run = run_of("qwen2")
    config = variant_run(run.folder, tmp_path / "run", chat_template=None)
    monkeypatch.setenv("PATH", stand_in_llama_quantize(tmp_path / "bin", "echo broken >&2; exit 3"))

    with pytest.raises(ExportError, match=r"llama-quantize failed \(exit 3\): broken"):
        export_model(config, tmp_path / "run", fmt="ollama", quant="q4_k_m", log=lambda _: None)
    assert list((tmp_path / "run" / "export").iterdir()) == []  # no file, no staging folder


def test_the_quantizer_gets_the_f16_file_and_its_output_is_published(run_of, tmp_path, monkeypatch):
    run = run_of("qwen2")
    config = variant_run(run.folder, tmp_path / "run", chat_template=None)
    # Records its arguments and copies SOURCE to TARGET.
    script = f'echo "$@" > {tmp_path}/arguments; cp "$1" "$2"'
    monkeypatch.setenv("PATH", stand_in_llama_quantize(tmp_path / "bin", script))

    report = export_model(config, tmp_path / "run", quant="q4_k_m", log=lambda _: None)

    source, target, kind = (tmp_path / "arguments").read_text().split()
    assert (Path(source).name, Path(target).name, kind) == (
        "run-q4_k_m.f16.gguf",
        "run-q4_k_m.gguf",
        "Q4_K_M",
    )
    assert sorted(p.name for p in report.gguf_file.parent.iterdir()) == ["run-q4_k_m.gguf"]
