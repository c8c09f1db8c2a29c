"""Axolotl's own LoRA/QLoRA examples (tests/fixtures/axolotl_examples/, 178 configs from
axolotl-ai-cloud/axolotl, each file naming its origin) as a test corpus: every one validates,
or is refused naming the Axolotl feature it needs; none is told "unknown key" for a key
Axolotl knows. A handful train 2 steps on a tiny local model, with only the model, the data
files and the run's folders swapped in by command-line overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune.config import load_config
from finetune.config.axolotl import (
    AXOLOTL_DATASET_KEYS,
    AXOLOTL_LEGACY_KEYS,
    AXOLOTL_PLUGIN_KEYS,
    AXOLOTL_TOP_LEVEL_KEYS,
)
from finetune.errors import ConfigError

CORPUS = Path(__file__).parents[1] / "fixtures" / "axolotl_examples"
FIXTURES = sorted(CORPUS.glob("*.y*ml"))
SAMPLES = Path(__file__).parents[2] / "data" / "samples"
AXOLOTL_KEYS = (
    AXOLOTL_TOP_LEVEL_KEYS | AXOLOTL_PLUGIN_KEYS | AXOLOTL_LEGACY_KEYS | AXOLOTL_DATASET_KEYS
)
# Words of the messages that refuse a feature by name.
REFUSALS = (
    "is an Axolotl feature finetune does not support",
    "Axolotl chat template finetune does not ship",
    "attention backend finetune does not offer",
    "Axolotl's own optimizer",
    "is an Axolotl plugin",
    "is not supported",
)


def classify(path: Path) -> tuple[str, list[tuple[str, str]]]:
    try:
        load_config(path)
    except ConfigError as error:
        messages = [message for _, message in error.problems]
        if any(word in message for message in messages for word in REFUSALS):
            return "refused", error.problems
        if all(message.startswith("unknown key") for message in messages):
            return "typo", error.problems
        return "other", error.problems
    return "valid", []


def test_the_corpus_is_whole():
    assert len(FIXTURES) == 178
    for path in FIXTURES:
        assert path.read_text().startswith("# origin: axolotl-ai-cloud/axolotl ")


def test_every_example_validates_or_is_refused_by_name():
    outcome = {path.name: classify(path) for path in FIXTURES}
    kinds = ("valid", "refused", "typo", "other")
    counts = {kind: sum(k == kind for k, _ in outcome.values()) for kind in kinds}
    print(json.dumps(counts))
    others = {name: problems for name, (kind, problems) in outcome.items() if kind == "other"}
    assert not others, others
    # The one "typo" left is a key Axolotl itself drops silently (`test_value` in one example).
    typos = {name for name, (kind, _) in outcome.items() if kind == "typo"}
    assert typos == {"llama-3__lora-1b-sample-packing-sequentially.yml"}
    assert counts["valid"] >= 77


def test_no_axolotl_key_is_called_unknown():
    for path in FIXTURES:
        for key, message in classify(path)[1]:
            name = key.split(".")[-1]
            assert not (message.startswith("unknown key") and name in AXOLOTL_KEYS), (path, key)


HANDFUL = [
    "llama-3__lora-1b.yml",
    "llama-3__qlora-1b.yml",
    "llama-3__instruct-lora-8b.yml",
    "phi__phi3-ft.yml",
    "archived__tiny-llama__lora.yml",
]


def _local_datasets(entries: list[dict]) -> list[dict]:
    """The example's dataset entries as written, reading a sample file of the same format."""
    swapped = []
    for entry in entries:
        local = {k: v for k, v in entry.items() if k not in ("path", "split", "data_files", "name")}
        if entry["type"] in ("chat_template", "chat_template.default"):
            local["path"] = str(SAMPLES / "chat.jsonl")
            local.pop("field_messages", None)
            local.pop("message_property_mappings", None)
        else:
            local["path"] = str(SAMPLES / "alpaca.jsonl")
        swapped.append(local)
    return swapped


@pytest.mark.parametrize("name", HANDFUL)
def test_a_handful_train_two_steps_as_written(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from finetune.cli import main

    monkeypatch.chdir(tmp_path)
    written = yaml.safe_load((CORPUS / name).read_text())
    datasets = yaml.safe_dump(_local_datasets(written["datasets"]), default_flow_style=True)
    overrides = [
        f"--base-model={tiny_model_dir}",
        f"--datasets={datasets.strip()}",
        "--max-steps=2",
        f"--output-dir={tmp_path / 'out'}",
        f"--dataset-prepared-path={tmp_path / 'prepared'}",
        "--attn-implementation=sdpa",  # flash_attention_2 needs a CUDA GPU
        "--flash-attention=false",
    ]
    with pytest.raises(SystemExit) as exited:
        main(["train", str(CORPUS / name), *overrides])
    output = capsys.readouterr()
    assert exited.value.code in (0, None), output.err[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    config = record["config"]
    for key in ("lora_r", "lora_alpha", "learning_rate", "micro_batch_size", "optimizer"):
        if written.get(key) is not None:
            assert (
                config[key] == pytest.approx(written[key])
                if isinstance(written[key], float)
                else config[key] == written[key]
            ), key
