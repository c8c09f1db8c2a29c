"""Where rows come from: local files and folders, `save_to_disk` folders, or the Hub."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pyarrow as pa

from finetune.config import DatasetConfig
from finetune.errors import DataSourceError
from finetune.hub import HUB_ID, hub_offline

EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}


def local_files(dataset: DatasetConfig) -> list[Path] | None:
    """The data files a local dataset reads, or None for a save_to_disk folder or a Hub id."""
    path = Path(dataset.path)
    if dataset.data_files:
        names = [dataset.data_files] if isinstance(dataset.data_files, str) else dataset.data_files
        base = path if path.is_dir() else Path(".")
        files = [base / name for name in names]
    elif path.is_file():
        files = [path]
    elif path.is_dir():
        if _is_saved_dataset(path):
            return None
        files = sorted(p for p in path.rglob("*") if p.suffix in EXTENSIONS and p.is_file())
        if not files:
            raise DataSourceError(f"{path}: folder has no data files ({', '.join(EXTENSIONS)})")
    else:
        return None
    for file in files:
        if not file.is_file():
            raise DataSourceError(f"{file}: data file not found")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def fingerprint(dataset: DatasetConfig) -> str:
    """A stable digest of what the dataset would read: file contents, or the Hub coordinates."""
    digest = hashlib.sha256()
    files = local_files(dataset)
    path = Path(dataset.path)
    if files is None and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    if files is None:  # a Hub dataset: its coordinates are all we know without the network
        digest.update(json.dumps([dataset.path, dataset.name, dataset.revision]).encode())
        return digest.hexdigest()
    for file in files:
        digest.update(str(file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_rows(dataset: DatasetConfig) -> datasets.Dataset:
    """The dataset's rows, in file order."""
    path = Path(dataset.path)
    files = local_files(dataset)
    if files is not None:
        tables = [_read_file(file, dataset.ds_type) for file in files]
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataSourceError(
                f"{dataset.path}: files have incompatible columns: {exc}"
            ) from None
        return datasets.Dataset(table)
    if path.is_dir():
        return _load_saved(path, dataset.split)
    return _load_hub(dataset)


def _read_file(file: Path, ds_type: str | None) -> pa.Table:
    kind = ds_type or EXTENSIONS.get(file.suffix)
    if kind is None:
        raise DataSourceError(
            f"{file}: unknown file type {file.suffix!r}; set ds_type: json, csv, parquet, arrow "
            "or text"
        )
    if file.stat().st_size == 0:
        raise DataSourceError(f"{file}: file is empty")
    try:
        if kind == "json":
            return _read_json(file)
        if kind == "text":
            lines = file.read_text(encoding="utf-8").splitlines()
            return pa.table({"text": [line for line in lines if line.strip()]})
        if kind == "csv":
            import pyarrow.csv

            return pyarrow.csv.read_csv(file)
        if kind == "parquet":
            import pyarrow.parquet

            return pyarrow.parquet.read_table(file)
        if kind == "arrow":
            return _read_arrow(file)
    except UnicodeDecodeError as exc:
        raise DataSourceError(
            f"{file}: not UTF-8 text (byte {exc.start}); convert the file to UTF-8"
        ) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataSourceError(f"{file}: cannot read as {kind}: {exc}") from None
    raise DataSourceError(f"{file}: unsupported ds_type {kind!r}")


def _read_json(file: Path) -> pa.Table:
    """JSON Lines, or one JSON array of objects; bad lines are reported by number."""
    text = file.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataSourceError(
                f"{file}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}"
            ) from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataSourceError(
                    f"{file}: line {number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one JSON object"
                ) from None
    if not isinstance(rows, list) or not rows:
        raise DataSourceError(f"{file}: no rows (expected JSON Lines or a JSON array of objects)")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataSourceError(
                f"{file}: row {number}: expected a JSON object, got {type(row).__name__}"
            )
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataSourceError(f"{file}: rows have inconsistent field types: {exc}") from None


def _read_arrow(file: Path) -> pa.Table:
    with pa.memory_map(str(file)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataSourceError(
                f"{path}: no split {split!r}; the folder has: {', '.join(loaded)}"
            )
        return loaded[split]
    return loaded


def _load_hub(dataset: DatasetConfig) -> datasets.Dataset:
    if not HUB_ID.match(dataset.path) or Path(dataset.path).suffix in EXTENSIONS:
        raise DataSourceError(f"{dataset.path}: no such file or folder")
    try:
        return datasets.load_dataset(
            dataset.path,
            name=dataset.name,
            split=dataset.split,
            revision=dataset.revision,
            data_files=dataset.data_files,
        )
    except Exception as exc:  # the Hub client raises many kinds; all mean "could not get it"
        reason = "HF_HUB_OFFLINE is set" if hub_offline() else f"{type(exc).__name__}: {exc}"
        raise DataSourceError(
            f"{dataset.path}: not a local file or folder, and it could not be loaded from the "
            f"Hugging Face Hub ({reason}). Check the path, or download the dataset first."
        ) from None
