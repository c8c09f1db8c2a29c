"""A finished tiny run to evaluate: the 2-layer Llama with SmolLM2's tokenizer, trained for a few
steps on quickstart facts by `finetune.train` itself (run.json, adapter, tokenizer), with 8 rows
held out, and merged by `finetune.merge`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

SAMPLES = Path(__file__).parents[2] / "data" / "samples"


@dataclass
class TinyRun:
    config_path: Path
    run_dir: Path
    heldout: Path  # 8 quickstart held-out questions, chat format

    def loaded(self, *overrides: str):
        from finetune.config import load_config

        return load_config(self.config_path, list(overrides))


def first_lines(source: Path, target: Path, count: int) -> Path:
    target.write_text("".join(line + "\n" for line in source.read_text().splitlines()[:count]))
    return target


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> TinyRun:
    from finetune.config import load_config
    from finetune.merge import merge_adapter
    from finetune.runfolder import merge_settings, read_record, run_config
    from finetune.train import train

    folder = tmp_path_factory.mktemp("eval-run")
    facts = first_lines(SAMPLES / "quickstart_facts.jsonl", folder / "facts.jsonl", 32)
    heldout = first_lines(SAMPLES / "quickstart_heldout.jsonl", folder / "heldout.jsonl", 8)
    values = {
        "base_model": str(tiny_model_dir),
        "datasets": [{"path": str(facts), "type": "chat_template"}],
        "chat_template": "tokenizer_default",
        "val_set_size": 8,
        "sequence_len": 256,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_linear": True,
        "micro_batch_size": 8,
        "max_steps": 3,
        "learning_rate": 5e-2,  # big steps: the adapter must move the model visibly
        "bf16": False,
        "output_dir": str(folder / "out"),
        "dataset_prepared_path": str(folder / "prepared"),
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    loaded = load_config(path)
    train(loaded.config, log=lambda message: None)
    run_dir = Path(loaded.config.output_dir)
    settings = merge_settings(run_config(loaded, run_dir), read_record(run_dir))
    merge_adapter(
        adapter_dir=run_dir, output_dir=run_dir / "merged", log=lambda message: None, **settings
    )
    return TinyRun(path, run_dir, heldout)
