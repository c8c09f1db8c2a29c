"""The prepared-data cache: its key, its lock, writing it whole and reading it back.

The cache lives at `dataset_prepared_path/<key>/`; the key covers everything that changes the
tokens, so a changed input misses and an unchanged config starts from the cache. A cache is
written staged (finetune/fs.py) under a file lock, so neither an interrupted run nor two runs at
once leave a cache that a later run trusts wrongly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets

from finetune import __version__
from finetune.config import DatasetConfig, FinetuneConfig
from finetune.data.sources import fingerprint
from finetune.fs import staged_folder

# Bump when the preprocessing code changes what it writes, so old caches miss.
CACHE_FORMAT = 4

# Top-level keys that change the prepared tokens (dataset entries are hashed whole).
_TOKEN_KEYS = (
    "sequence_len",
    "excess_length_strategy",
    "chat_template",
    "chat_template_jinja",
    "train_on_inputs",
    "sample_packing",
    "eval_sample_packing",
    "pad_to_sequence_len",
    "seed",
    "val_set_size",
    "shuffle_merged_datasets",
    "default_system_message",
    "special_tokens",
    "tokens",
)


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    path: Path
    summary: dict
    from_cache: bool
    chat_template: str | None = None


def cache_key(
    config: FinetuneConfig, tokenizer, entries: list[tuple[DatasetConfig, str | None]]
) -> str:
    """Hash of everything that changes the prepared tokens; `entries` are (dataset, template)."""
    tokenizer_digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    parts = {
        "format": CACHE_FORMAT,
        "finetune": __version__,
        "tokenizer": tokenizer_digest,
        "special_tokens": tokenizer.special_tokens_map,
        "datasets": [
            {"options": d.model_dump(mode="json"), "data": fingerprint(d), "template": t}
            for d, t in entries
        ],
        "n_train_datasets": len(config.datasets),
        **{name: getattr(config, name) for name in _TOKEN_KEYS},
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def cache_lock(root: Path, key: str) -> Iterator[None]:
    """An exclusive lock on one cache entry: a second preprocess of the same data waits, then
    reuses the result. Bad input leaves nothing behind: not even the folder this run created."""
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f"{key}.lock"
    try:
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    except BaseException:
        if created_root and [p.name for p in root.iterdir()] == [lock.name]:
            lock.unlink()
            root.rmdir()
        raise


def is_complete(target: Path) -> bool:
    return (target / "summary.json").is_file()


def write_prepared(
    target: Path, train: datasets.Dataset, evaluation: datasets.Dataset | None, summary: dict
) -> None:
    """Write one cache entry whole, replacing an incomplete one."""
    with staged_folder(target, replace=True) as staging:
        train.save_to_disk(str(staging / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(staging / "eval"))
        (staging / "summary.json").write_text(json.dumps(summary, indent=2))


def read_prepared(target: Path, from_cache: bool) -> PreparedData:
    summary = json.loads((target / "summary.json").read_text())
    train = datasets.load_from_disk(str(target / "train"))
    eval_dir = target / "eval"
    evaluation = datasets.load_from_disk(str(eval_dir)) if eval_dir.is_dir() else None
    return PreparedData(train, evaluation, target, summary, from_cache)
