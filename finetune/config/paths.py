"""Where a config's input paths point: the working directory first (as Axolotl reads them),
else the config file's folder; DeepSpeed configs also by the name of a bundled one.

Output paths (`output_dir`, `dataset_prepared_path`) are not resolved: they are relative to
the working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.config.schema import DatasetConfig, FinetuneConfig

Problem = tuple[str, str]

# DeepSpeed configs shipped inside the package, found by name (`zero3`, `zero3.json`,
# `deepspeed_configs/zero3.json`).
BUNDLED_DEEPSPEED = Path(__file__).parent / "deepspeed"


def resolve_paths(config: FinetuneConfig, folder: Path, problems: list[Problem]) -> FinetuneConfig:
    """The config with its input paths resolved (working directory first, then the config's
    folder); DeepSpeed configs also by bundled name."""
    update: dict[str, Any] = {}
    keys = ("base_model", "base_model_config", "tokenizer_config", "lora_model_dir")
    for key in (*keys, "resume_from_checkpoint"):
        value = getattr(config, key)
        if value is not None:
            update[key] = locate(value, folder) or value
    if config.chat_template_jinja:
        update["chat_template_jinja"] = _template_path(config.chat_template_jinja, folder)
    if isinstance(config.deepspeed, str):
        update["deepspeed"] = _resolve_deepspeed(config.deepspeed, folder, problems)
    for list_key in ("datasets", "test_datasets"):
        entries = getattr(config, list_key)
        if entries:
            update[list_key] = [_resolve_dataset_paths(entry, folder) for entry in entries]
    return config.model_copy(update=update)


def _resolve_dataset_paths(dataset: DatasetConfig, folder: Path) -> DatasetConfig:
    update: dict[str, Any] = {}
    path = locate(dataset.path, folder)
    if path is not None:
        update["path"] = path
    if (
        dataset.data_files
        and (path is None or not Path(path).is_dir())
        and not looks_like_hub_id(dataset.path)
    ):
        names = [dataset.data_files] if isinstance(dataset.data_files, str) else dataset.data_files
        update["data_files"] = [locate(name, folder) or name for name in names]
    if dataset.chat_template_jinja and not is_inline_template(dataset.chat_template_jinja):
        update["chat_template_jinja"] = _template_path(dataset.chat_template_jinja, folder)
    return dataset.model_copy(update=update) if update else dataset


def _template_path(value: str, folder: Path) -> str:
    """chat_template_jinja: a template written inline stays as it is; a path is located."""
    return value if is_inline_template(value) else locate(value, folder) or value


def locate(value: str, folder: Path) -> str | None:
    """Where a relative input path is: in the working directory, else in the config's folder
    (absolute then); None when it is in neither (a Hub id, or a mistake to report)."""
    path = Path(value).expanduser()
    if path.exists():
        return str(path.resolve())
    if not path.is_absolute() and (folder / path).exists():
        return str((folder / path).resolve())
    return None


def searched_folders(value: str, folder: Path) -> str:
    """`in W and in F` for a "not found" message: the folders a relative path was looked for in."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return ""
    places = [str(Path.cwd())]
    if folder.resolve() != Path.cwd().resolve():
        places.append(str(folder))
    return " (looked in " + " and ".join(places) + ")"


def is_inline_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def looks_like_hub_id(name: str) -> bool:
    from finetune.hub import HUB_ID

    return bool(HUB_ID.match(name)) and Path(name).suffix not in (
        ".json",
        ".jsonl",
        ".csv",
        ".parquet",
        ".arrow",
        ".txt",
        ".gguf",
        ".yaml",
        ".yml",
    )


def _resolve_deepspeed(value: str, folder: Path, problems: list[Problem]) -> str:
    found = locate(value, folder)
    name = Path(value).name.removesuffix(".json")
    bundled = BUNDLED_DEEPSPEED / f"{name}.json"
    # A bare name (`zero3`, `zero3.json`) or Axolotl's `deepspeed_configs/zero3.json` may mean
    # a bundled config; any other path must exist.
    by_name = Path(value).parent in (Path("."), Path("deepspeed_configs"))
    if found is None and by_name and bundled.is_file():
        found = str(bundled)
    if found is None:
        available = ", ".join(sorted(p.stem for p in BUNDLED_DEEPSPEED.glob("*.json")))
        problems.append(
            (
                "deepspeed",
                f"{value} not found{searched_folders(value, folder)}"
                + (f", and no bundled config is named {name}" if by_name else "")
                + f"; give a DeepSpeed JSON path or a bundled name: {available}",
            )
        )
        return value
    try:
        json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(("deepspeed", f"cannot read {found}: {exc}"))
    except json.JSONDecodeError as exc:
        problems.append(
            (
                "deepspeed",
                f"{found} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            )
        )
    return found
