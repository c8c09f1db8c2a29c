"""The run folder is the contract between verbs: `train` records what the run used, and
`merge`, `inference` (and every later verb) read that record first, and the YAML only for what
the user overrides on the command line.

`output_dir/run.json` holds the run's id, the finetune version, whether it finished, the fully
resolved config (machine-resolved precision, quantization settings, chat template, dataset
formats, revisions, trust_remote_code) and the base model folder actually loaded. Each
checkpoint gets the run's id, so a checkpoint of another run is never resumed.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune import __version__
from finetune.config import FinetuneConfig, LoadedConfig
from finetune.config.load import apply_overrides
from finetune.errors import TrainingError
from finetune.fs import hidden_sibling

RECORD = "run.json"
CHECKPOINT_MARK = "finetune_run.json"
# Files and folders whose presence makes a folder a finetune run folder.
RUN_FILES = (RECORD, "config.yaml", "adapter_config.json", "metrics.jsonl", "interrupted")


@dataclass
class RunRecord:
    run_id: str
    finetune_version: str
    started: float
    config: dict  # the resolved FinetuneConfig, as JSON
    base_model_folder: str | None = None  # what was loaded (the converted default model, ...)
    compute_dtype: str | None = None  # bf16 / fp16 / fp32
    quantization: dict | None = None  # the BitsAndBytesConfig training used
    chat_template: str | None = None
    finished: float | None = None
    extra: dict = field(default_factory=dict)

    def resolved_config(self) -> FinetuneConfig:
        return FinetuneConfig.model_validate(self.config)


def new_record(config: FinetuneConfig) -> RunRecord:
    return RunRecord(
        run_id=uuid.uuid4().hex,
        finetune_version=__version__,
        started=time.time(),
        config=config.model_dump(mode="json"),
    )


def write_record(output_dir: Path, record: RunRecord) -> None:
    """run.json, replaced atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(output_dir / RECORD)
    staging.write_text(json.dumps(asdict(record), indent=2, default=str) + "\n")
    staging.replace(output_dir / RECORD)


def read_record(output_dir: Path) -> RunRecord | None:
    """The run's record, or None for a folder no finetune run has written one into."""
    path = Path(output_dir) / RECORD
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
        return RunRecord(**values)
    except (OSError, ValueError, TypeError) as exc:
        raise TrainingError(f"{path}: not a readable run record ({exc}); was it edited?") from None


def run_config(loaded: LoadedConfig, run_dir: Path | None = None) -> FinetuneConfig:
    """The config a later verb acts on: the run's own record, with the command line's overrides
    applied; the YAML alone for a run folder without a record."""
    record = read_record(Path(run_dir or loaded.config.output_dir))
    if record is None:
        return loaded.config
    return apply_overrides(record.resolved_config(), loaded.overrides, loaded.folder, loaded.path)


def mark_checkpoint(checkpoint: Path, run_id: str) -> None:
    (checkpoint / CHECKPOINT_MARK).write_text(json.dumps({"run_id": run_id}) + "\n")


def checkpoint_run_id(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / CHECKPOINT_MARK).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_run_folder(folder: Path) -> bool:
    return folder.is_dir() and (
        any((folder / name).exists() for name in RUN_FILES)
        or any(folder.glob("checkpoint-*"))
        or (folder / "merged").exists()
    )


def move_run_aside(output_dir: Path) -> Path | None:
    """`--force`: the previous run (checkpoints, merged/, interrupted/, logs) moves to a hidden
    sibling before training, so nothing of it can be picked up; `delete_moved_run` removes it
    once the new run has finished. Returns where it went (None when there was no run)."""
    output_dir = Path(output_dir)
    if not is_run_folder(output_dir):
        return None
    here = Path.cwd().resolve()
    target = output_dir.resolve()
    if target == here or target in here.parents or target == Path.home().resolve():
        raise TrainingError(
            f"output_dir: {output_dir} is the working directory (or holds it); --force will not "
            "move it aside; give the run a folder of its own"
        )
    aside = hidden_sibling(output_dir, "previous")
    output_dir.rename(aside)
    return aside


def delete_moved_run(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def merge_settings(config: FinetuneConfig, record: RunRecord | None) -> dict[str, Any]:
    """The arguments `merge_adapter` needs beyond paths, from what the run used: the base model
    folder loaded, its revision, and for an nf4 round trip the compute dtype and double
    quantization of training."""
    from finetune.model.load import compute_dtype_name
    from finetune.model.source import resolve_base_model

    quantization = (record.quantization if record else None) or {}
    recorded = record.base_model_folder if record else None
    loaded_from_disk = recorded is not None and Path(recorded).exists()
    base = recorded if loaded_from_disk else resolve_base_model(config.base_model)
    compute = (record.compute_dtype if record else None) or compute_dtype_name(config)
    return {
        "base": base,
        "revision": config.revision_of_model,
        "nf4_compute_dtype": compute,
        "nf4_double_quant": quantization.get(
            "bnb_4bit_use_double_quant",
            config.bnb_config_kwargs.get("bnb_4bit_use_double_quant", True),
        ),
        "trust_remote_code": config.trust_remote_code,
    }
