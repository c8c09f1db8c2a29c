"""Every shipped example runs as written against its sample data, from any working directory:
`preprocess` of each from a folder that is not the repository. Examples whose base model is a
gated Hub model get the embedded SmolLM2 by override (only its tokenizer is used here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.cli import main

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
SAMPLES = ROOT / "data" / "samples"


def test_there_is_an_example_for_every_sample_format():
    used = set()
    for path in EXAMPLES:
        for dataset in yaml.safe_load(path.read_text())["datasets"]:
            used.add(Path(dataset["path"]).name)
    formats = {p.name for p in SAMPLES.iterdir()} - {"quickstart_heldout.jsonl"}
    assert formats <= used, f"no example uses {sorted(formats - used)}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_preprocesses_from_another_folder(path, tmp_path, monkeypatch, capsys, smollm2_dir):
    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load(path.read_text())["base_model"]
    overrides = ["--dataset-prepared-path", str(tmp_path / "prepared")]
    if not base.startswith("~"):  # a gated Hub model: the embedded one's tokenizer stands in
        overrides += ["--base-model", str(smollm2_dir)]
    with pytest.raises(SystemExit) as exited:
        main(["preprocess", str(path), *overrides])
    output = capsys.readouterr()
    assert exited.value.code in (0, None), output.err
    assert "rows read" in output.out
    assert "cache: " in output.out
