"""The held-out samples: the run's prepared eval split, or a file given with --data, tokenized and
masked exactly as training does; each sample with its prompt and its reference answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
from pydantic import ValidationError

from finetune.config import DatasetConfig, FinetuneConfig
from finetune.data.tokenize import IGNORE_INDEX
from finetune.errors import EvaluationError


@dataclass
class EvalSample:
    """One held-out sample. `prompt_ids` are its tokens before the first trained token (exactly
    what training conditioned the answer on); `answer_ids` are the trained tokens of that first
    answer, up to and excluding its stop token."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass
class HeldOut:
    rows: datasets.Dataset  # prepared: input_ids, labels
    source: str  # what the rows are, for the report: "val_set_size 0.1 of ...", a file


def held_out_data(
    config: FinetuneConfig,
    data: str | Path | None = None,
    data_type: str | None = None,
    log: Callable[[str], object] = print,
) -> HeldOut:
    """The held-out rows: `data` (a dataset file or folder, of `data_type`, by default the type
    of the run's first dataset), else the run's own eval split (`val_set_size` /
    `test_datasets`). Prepared (and cached) by the same code, template and masking as training."""
    from finetune.data.prepare import prepare_datasets
    from finetune.model.load import load_tokenizer

    if data is not None:
        config, source = _config_for_file(config, Path(data), data_type)
    elif data_type is not None:
        raise EvaluationError("--type goes with --data FILE: it is the type of that file's rows")
    elif not config.has_eval_data():
        raise EvaluationError(
            "this run has no held-out data (val_set_size is 0 and no test_datasets); give a "
            "file of held-out rows: finetune eval CONFIG --data FILE [--type TYPE]"
        )
    else:
        source = _split_name(config)
    prepared = prepare_datasets(config, load_tokenizer(config), log=log)
    rows = prepared.train if data is not None else prepared.eval
    if rows is None or len(rows) == 0:
        raise EvaluationError(f"{source}: no held-out samples left after preprocessing")
    return HeldOut(rows, source)


def eval_samples(
    rows: datasets.Dataset, stop_ids: list[int], max_samples: int | None = None
) -> list[EvalSample]:
    """The first `max_samples` rows (all by default) as samples with prompt and reference."""
    if max_samples:
        rows = rows.select(range(min(max_samples, len(rows))))
    return [sample_of(row["input_ids"], row["labels"], stop_ids) for row in rows]


def sample_of(input_ids: list[int], labels: list[int], stop_ids: list[int]) -> EvalSample:
    """Split one prepared sample into its prompt and its first answer (module doc)."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    start = trained[0]
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX and labels[end] not in stop_ids:
        end += 1
    return EvalSample(
        input_ids=list(input_ids),
        labels=list(labels),
        prompt_ids=list(input_ids[:start]),
        answer_ids=list(input_ids[start:end]),
    )


def _config_for_file(
    config: FinetuneConfig, path: Path, data_type: str | None
) -> tuple[FinetuneConfig, str]:
    """The run's config with `path` as its only dataset, in file order, nothing split off."""
    if not path.exists():
        raise EvaluationError(f"--data {path}: no such file or folder")
    first = config.datasets[0]
    try:
        if data_type is None:  # the training data's type and its field options
            entry = DatasetConfig.model_validate(
                {
                    **first.model_dump(),
                    "path": str(path),
                    "data_files": None,
                    "ds_type": None,
                    "split": "train",
                    "name": None,
                    "revision": None,
                }
            )
        else:
            entry = DatasetConfig(path=str(path), type=data_type)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise EvaluationError(f"--type {data_type}: {message}") from None
    updated = config.model_copy(
        update={
            "datasets": [entry],
            "test_datasets": None,
            "val_set_size": 0.0,
            "shuffle_merged_datasets": False,
        }
    )
    return updated, f"{path} ({entry.type_name})"


def _split_name(config: FinetuneConfig) -> str:
    if config.test_datasets:
        return "test_datasets: " + ", ".join(d.path for d in config.test_datasets)
    return f"val_set_size {config.val_set_size:g} of the run's datasets"
