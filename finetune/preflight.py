"""Checks before any work: everything about a run's inputs that can be known without loading
weights or training.

`validate` runs them all and reports every problem at once; `preprocess` and `train` run them
first too, so a run fails in its first second with the same message. Each problem names the
config key, the path as written and the folders it was looked for in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config import DatasetConfig, FinetuneConfig, LoadedConfig
from finetune.config.paths import is_inline_template, looks_like_hub_id, searched_folders
from finetune.errors import ConfigError, FinetuneError
from finetune.hub import hub_offline, in_hub_cache

Problem = tuple[str, str]


@dataclass
class Findings:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_inputs(loaded: LoadedConfig, sample_data: bool = True) -> Findings:
    """Every input problem of the run, and what is worth a warning. `sample_data=False` skips
    reading the data files' rows (`validate --fast`)."""
    config, folder = loaded.config, loaded.folder
    found = Findings()
    _check_base_model(config, folder, found)
    _check_template_file("chat_template_jinja", config.chat_template_jinja, folder, found)
    for list_key in ("datasets", "test_datasets"):
        for index, dataset in enumerate(getattr(config, list_key) or []):
            where = f"{list_key}[{index}]"
            _check_template_file(
                f"{where}.chat_template_jinja", dataset.chat_template_jinja, folder, found
            )
            _check_dataset(config, dataset, where, folder, sample_data, found)
    _check_sequence_len(config, found)
    return found


def raise_problems(loaded: LoadedConfig, sample_data: bool = True) -> list[str]:
    """Run the checks; raise ConfigError with every problem; return the warnings."""
    found = check_inputs(loaded, sample_data)
    if found.problems:
        raise ConfigError(loaded.path, found.problems)
    return found.warnings


def _check_base_model(config: FinetuneConfig, folder: Path, found: Findings) -> None:
    from finetune.model.default_model import default_model_path
    from finetune.model.source import check_base_model

    name = config.base_model
    path = Path(name).expanduser()
    if path == default_model_path():
        return  # converted from its wheel on first use
    if not path.exists():
        if looks_like_hub_id(name) and not name.startswith(("~", ".", "/")):
            if hub_offline() and not in_hub_cache(name, config.revision_of_model):
                found.problems.append(
                    (
                        "base_model",
                        f"{name} is not a local folder{searched_folders(name, folder)} and not in "
                        "the Hugging Face cache, and HF_HUB_OFFLINE is set; download it first or "
                        "point base_model at a folder",
                    )
                )
            return
        found.problems.append(
            (
                "base_model",
                f"{name}: no such folder or .gguf file{searched_folders(name, folder)}; a Hub "
                "id looks like owner/name",
            )
        )
        return
    try:
        check_base_model(config)
    except FinetuneError as exc:
        found.problems.append(("base_model", str(exc).removeprefix("base_model: ")))


def _check_template_file(key: str, value: str | None, folder: Path, found: Findings) -> None:
    if not value or is_inline_template(value):
        return
    path = Path(value).expanduser()
    if not path.is_file():
        found.problems.append(
            (
                key,
                f"{value}: no such template file{searched_folders(value, folder)} (give a path "
                "to a .jinja file, or the template text itself)",
            )
        )
        return
    from finetune.data.chat_templates import compile_template

    try:
        compile_template(path.read_text(encoding="utf-8"))
    except (FinetuneError, UnicodeDecodeError) as exc:
        found.problems.append((key, f"{value}: {exc}"))


def _check_dataset(
    config: FinetuneConfig,
    dataset: DatasetConfig,
    where: str,
    folder: Path,
    sample_data: bool,
    found: Findings,
) -> None:
    from finetune.data.sources import is_hub_dataset, local_files, sample_rows, split_problem

    if is_hub_dataset(dataset):
        if hub_offline():
            found.problems.append(
                (
                    f"{where}.path",
                    f"{dataset.path} is not a local file or folder"
                    f"{searched_folders(dataset.path, folder)}, and HF_HUB_OFFLINE is set, so it "
                    "cannot come from the Hugging Face Hub; download it first or fix the path",
                )
            )
        else:
            found.warnings.append(
                f"{where}.path: {dataset.path} is not a local file or folder; preprocess will "
                "load it from the Hugging Face Hub"
            )
        return
    if not Path(dataset.path).expanduser().exists():
        found.problems.append(
            (
                f"{where}.path",
                f"{dataset.path}: no such file or folder{searched_folders(dataset.path, folder)}",
            )
        )
        return
    try:
        local_files(dataset)
        problem = split_problem(dataset)
        if problem:
            found.problems.append((f"{where}.split", problem))
            return
        rows = sample_rows(dataset) if sample_data else []
    except FinetuneError as exc:
        found.problems.append((f"{where}.path", str(exc)))
        return
    _check_rows(config, dataset, where, rows, found)


def _check_rows(
    config: FinetuneConfig,
    dataset: DatasetConfig,
    where: str,
    rows: list[tuple[str, dict]],
    found: Findings,
) -> None:
    """The sampled rows have the fields the type needs, and its strategy can read them."""
    from finetune.data.strategies import Context, RowError, strategy_for
    from finetune.data.strategies.chat_template import normalize_messages

    strategy = strategy_for(dataset)
    required, optional = strategy.fields(dataset)
    ctx = Context(dataset=dataset, config=config, tokenizer=None)
    for place, row in rows:
        missing = [name for name in required if name not in row]
        if missing:
            expected = ", ".join(required) + (
                f" (optional: {', '.join(optional)})" if optional else ""
            )
            found.problems.append(
                (
                    f"{where}.path",
                    f"{place}: missing field {', '.join(map(repr, missing))} for type "
                    f"{dataset.type_name}; fields found: {', '.join(row) or 'none'}; expected: "
                    f"{expected}",
                )
            )
            return
        try:
            if dataset.type == "chat_template":
                normalize_messages(row, ctx)  # rendering needs the tokenizer's template
            else:
                strategy.render(row, ctx)
        except RowError as exc:
            found.problems.append((f"{where}.path", f"{place}: {exc}"))
            return


def _check_sequence_len(config: FinetuneConfig, found: Findings) -> None:
    """sequence_len beyond the model's context length trains positions it was never made for."""
    limit = _max_positions(config)
    if limit and config.sequence_len > limit:
        found.warnings.append(
            f"sequence_len: {config.sequence_len} is longer than the model's "
            f"max_position_embeddings {limit}; positions past {limit} were never trained (use "
            "a model with a longer context, or lower sequence_len)"
        )


def _max_positions(config: FinetuneConfig) -> int | None:
    """The model config's max_position_embeddings, read from a local or cached config.json."""
    from huggingface_hub import try_to_load_from_cache

    name = config.base_model_config or config.base_model
    path = Path(name).expanduser()
    file = path / "config.json" if path.is_dir() else None
    if file is None and not path.exists():
        try:
            cached = try_to_load_from_cache(name, "config.json", revision=config.revision_of_model)
        except Exception:  # not a Hub id the client accepts: nothing cached
            cached = None
        file = Path(cached) if isinstance(cached, str) else None
    if file is None or not file.is_file():
        return None
    try:
        settings = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    settings = settings.get("text_config", settings)
    value = settings.get("max_position_embeddings")
    return value if isinstance(value, int) else None
