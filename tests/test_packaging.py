"""The package alone, installed from its wheel outside the repository, has what configs name:
the bundled DeepSpeed configs and chat templates. An example config validates there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_installed_wheel_resolves_bundled_configs_and_templates(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation"]
        + ["-q", "-w", str(tmp_path / "wheel")],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "wheel").glob("finetune-*.whl"))
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
        check=True,
        capture_output=True,
    )
    # A user's project: an example config and its data, no repository around it.
    project = tmp_path / "project"
    project.mkdir()
    (project / "rows.jsonl").write_text(
        (ROOT / "data" / "samples" / "alpaca.jsonl").read_text(encoding="utf-8")
    )
    example = (ROOT / "examples" / "configs" / "llama3-70b-lora-zero3.yaml").read_text()
    example = example.replace("../../data/samples/alpaca.jsonl", "rows.jsonl")
    (project / "config.yaml").write_text(example)
    check = (
        "import finetune, sys\n"
        "from finetune.config import load_config\n"
        "from finetune.data.chat_templates import BUILTIN_TEMPLATES\n"
        "assert finetune.__file__.startswith(sys.argv[1]), finetune.__file__\n"
        "config = load_config('config.yaml').config\n"
        "assert config.deepspeed.startswith(sys.argv[1]), config.deepspeed\n"
        "assert 'chatml' in BUILTIN_TEMPLATES\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
    shutil.rmtree(site)
