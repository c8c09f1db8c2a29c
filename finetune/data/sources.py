"""Where rows come from: local files and folders, `save_to_disk` folders, or the Hub.

`split` selects rows with the Hugging Face split syntax for every source (`train`,
`train[:10%]`, `train[100:200]`); a local file or folder of files has one split, `train`.
`sample_rows` reads a dataset's first and last rows only, for `validate`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pyarrow as pa

from finetune.config import DatasetConfig
from finetune.errors import DataSourceError
from finetune.hub import HUB_ID, hub_offline, resolved_dataset_revision

EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}


def is_hub_dataset(dataset: DatasetConfig) -> bool:
    """True when `path` is no local file or folder but can be a Hub dataset id."""
    path = Path(dataset.path).expanduser()
    return not path.exists() and bool(HUB_ID.match(dataset.path)) and path.suffix not in EXTENSIONS


def local_files(dataset: DatasetConfig) -> list[Path] | None:
    """The data files a local dataset reads, or None for a save_to_disk folder or a Hub id."""
    path = Path(dataset.path).expanduser()
    if is_hub_dataset(dataset):
        return None  # data_files, if any, name files in the Hub repository
    if dataset.data_files:
        names = [dataset.data_files] if isinstance(dataset.data_files, str) else dataset.data_files
        base = path if path.is_dir() else Path(".")
        files = []
        for name in names:
            pattern = base / Path(name).expanduser()
            matched = sorted(pattern.parent.glob(pattern.name)) if _is_glob(name) else []
            files += matched or [pattern]
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


def _is_glob(name: str) -> bool:
    return any(char in name for char in "*?[")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def fingerprint(dataset: DatasetConfig) -> str:
    """A stable digest of what the dataset would read: file contents, or the Hub coordinates."""
    digest = hashlib.sha256()
    files = local_files(dataset)
    path = Path(dataset.path)
    if files is None and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    if files is None:  # a Hub dataset: its coordinates, and the commit they stand for
        commit = resolved_dataset_revision(dataset.path, dataset.revision)
        coordinates = [dataset.path, dataset.name, dataset.revision, dataset.data_files, commit]
        digest.update(json.dumps(coordinates).encode())
        return digest.hexdigest()
    for file in files:
        digest.update(str(file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_rows(dataset: DatasetConfig) -> datasets.Dataset:
    """The dataset's rows of its `split`, in file order."""
    path = Path(dataset.path).expanduser()
    files = local_files(dataset)
    if files is not None:
        tables = [_read_file(file, dataset.ds_type) for file in files]
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataSourceError(
                f"{dataset.path}: files have incompatible columns: {exc}"
            ) from None
        return select_split({"train": datasets.Dataset(table)}, dataset.split, dataset.path)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return select_split(splits, dataset.split, dataset.path)
    return _load_hub(dataset)


def select_split(splits: dict[str, datasets.Dataset], split: str, where: str) -> datasets.Dataset:
    """The rows `split` names, with Hugging Face's split syntax (`train[:10%]`)."""
    try:
        instructions = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError):
        raise DataSourceError(
            f"{where}: split {split!r} is not a split name with an optional slice, like train, "
            "train[:10%] or train[100:200]"
        ) from None
    try:
        absolute = instructions.to_absolute({name: len(rows) for name, rows in splits.items()})
    except (ValueError, KeyError):
        raise DataSourceError(
            f"{where}: no split {split.split('[')[0]!r} here; it has: {', '.join(splits)} "
            "(a local file or folder of files has one split, train)"
        ) from None
    parts = [
        splits[part.splitname].select(range(part.from_, part.to))
        if (part.from_, part.to) != (0, len(splits[part.splitname]))
        else splits[part.splitname]
        for part in absolute
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


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


def _load_hub(dataset: DatasetConfig) -> datasets.Dataset:
    if not is_hub_dataset(dataset):
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


def split_problem(dataset: DatasetConfig) -> str | None:
    """Why `split` cannot select rows of a local dataset, checked without reading it."""
    try:
        instructions = datasets.ReadInstruction.from_spec(dataset.split)
        names = {part.splitname for part in instructions.to_absolute({"train": 1, "test": 1})}
    except (ValueError, AssertionError, KeyError):
        return (
            f"{dataset.split}: not a split name with an optional slice, like train, "
            "train[:10%] or train[100:200]"
        )
    if local_files(dataset) is not None and names != {"train"}:
        return f"{dataset.split}: a local file or folder of files has one split, train"
    return None


# Files up to this size are read whole by `sample_rows` (every line checked); larger ones only
# at their ends.
SAMPLE_WHOLE_FILE_BYTES = 32 * 1024 * 1024


def sample_rows(dataset: DatasetConfig) -> list[tuple[str, dict]]:
    """A few rows of a local dataset, each with where it is (`FILE: row N`), for `validate`:
    the first and last row of each file. Raises DataSourceError as `load_rows` would."""
    files = local_files(dataset)
    if files is None:
        return []
    samples = []
    for file in files:
        kind = dataset.ds_type or EXTENSIONS.get(file.suffix)
        if kind == "json" and file.stat().st_size > SAMPLE_WHOLE_FILE_BYTES:
            samples += _json_lines_ends(file)
            continue
        if kind in ("parquet", "arrow") and file.stat().st_size > SAMPLE_WHOLE_FILE_BYTES:
            continue  # read only by preprocess; its schema is checked there
        table = _read_file(file, dataset.ds_type)  # read whole: every row must parse
        picked = sorted({0, table.num_rows - 1}) if table.num_rows else []
        samples += [(f"{file}: row {i + 1}", table.slice(i, 1).to_pylist()[0]) for i in picked]
    return samples


def _json_lines_ends(file: Path) -> list[tuple[str, dict]]:
    """The first and last non-empty lines of a large JSON Lines file, parsed."""
    with open(file, "rb") as handle:
        first_number, first = 0, b""
        for first_number, line in enumerate(handle, start=1):  # noqa: B007 (number used below)
            if line.strip():
                first = line
                break
        handle.seek(max(0, file.stat().st_size - 1_000_000))
        tail = handle.read().splitlines()
    last = next((line for line in reversed(tail) if line.strip()), first)
    rows = []
    for label, line in ((f"line {first_number}", first), ("its last line", last)):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataSourceError(
                f"{file}: {label}: invalid JSON ({exc}); each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DataSourceError(f"{file}: {label}: expected a JSON object")
        rows.append((f"{file}: {label}", row))
    return rows
