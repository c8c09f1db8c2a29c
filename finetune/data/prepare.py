"""`finetune preprocess`: datasets -> tokenized, label-masked, cached training and eval sets.

The cache lives at `dataset_prepared_path/<hash>/`; the hash covers everything that changes
the tokens, so a changed input misses and an unchanged config starts from the cache. It is
written under a temporary name and renamed when complete, under a file lock, so neither an
interrupted run nor two runs at once leave a cache that a later run trusts wrongly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from finetune import __version__
from finetune.config import DatasetConfig, FinetuneConfig
from finetune.data import chat_templates
from finetune.data.sources import fingerprint, load_rows
from finetune.data.strategies import Context, RowError, strategy_for
from finetune.data.tokenize import IGNORE_INDEX, Tokenized, split_into_chunks, tokenize_rendered
from finetune.errors import FinetuneError

# Bump when the preprocessing code changes what it writes, so old caches miss.
CACHE_FORMAT = 1
BATCH_ROWS = 2000


class DataRowError(FinetuneError):
    """A dataset row (or a whole dataset) that cannot be turned into training data."""


@dataclass
class Counts:
    rows_read: int = 0
    kept: int = 0
    too_long: int = 0
    truncated: int = 0
    nothing_to_train: int = 0
    chunks_added: int = 0


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    path: Path
    summary: dict
    from_cache: bool
    chat_template: str | None = None


def prepare_datasets(
    config: FinetuneConfig, tokenizer, log: Callable[[str], None] = print
) -> PreparedData:
    """Prepared train (and eval) data: from the cache when every input is unchanged."""
    datasets.disable_progress_bars()
    if config.dataset_processes:
        # The Rust tokenizer batches rows over a rayon thread pool, sized when first used.
        os.environ["RAYON_NUM_THREADS"] = str(config.dataset_processes)
    templates = [_template_for(d, config, tokenizer) for d in _all_datasets(config)]
    global_template = chat_templates.resolve_chat_template(
        config.chat_template, config.chat_template_jinja, tokenizer
    )
    key = cache_key(config, tokenizer, templates)
    root = Path(config.dataset_prepared_path)
    target = root / key
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f"{key}.lock"
    try:
        with _locked(lock):
            if (target / "summary.json").is_file():
                prepared = _load(target, from_cache=True)
                log(f"Using the prepared data in {target} (inputs unchanged).")
            else:
                prepared = _build(config, tokenizer, templates, target, log)
    except BaseException:
        # Bad input leaves nothing behind: not even the folder this run created for the cache.
        if created_root and [p.name for p in root.iterdir()] == [lock.name]:
            lock.unlink()
            root.rmdir()
        raise
    # The template the run trains with: the config's, else the (single) one the datasets used.
    used = {t for t in templates if t}
    prepared.chat_template = global_template or (used.pop() if len(used) == 1 else None)
    return prepared


def _all_datasets(config: FinetuneConfig) -> list[DatasetConfig]:
    return [*config.datasets, *(config.test_datasets or [])]


def _template_for(dataset: DatasetConfig, config: FinetuneConfig, tokenizer) -> str | None:
    if dataset.type != "chat_template":
        return None
    return chat_templates.resolve_chat_template(
        dataset.chat_template or config.chat_template or "tokenizer_default",
        dataset.chat_template_jinja or config.chat_template_jinja,
        tokenizer,
    )


def cache_key(config: FinetuneConfig, tokenizer, templates: list[str | None]) -> str:
    """Hash of everything that changes the prepared tokens."""
    tokenizer_digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    parts = {
        "format": CACHE_FORMAT,
        "finetune": __version__,
        "tokenizer": tokenizer_digest,
        "special_tokens": tokenizer.special_tokens_map,
        "datasets": [
            {"options": d.model_dump(mode="json"), "data": fingerprint(d), "template": t}
            for d, t in zip(_all_datasets(config), templates, strict=True)
        ],
        "n_train_datasets": len(config.datasets),
        **{
            name: getattr(config, name)
            for name in (
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
        },
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock: a second preprocess of the same data waits, then reuses the result."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(config, tokenizer, templates, target: Path, log) -> PreparedData:
    n_train = len(config.datasets)
    names = [f"datasets[{i}]" for i in range(n_train)]
    names += [f"test_datasets[{i}]" for i in range(len(config.test_datasets or []))]
    train_parts, eval_parts, counts = [], [], []
    entries = zip(names, _all_datasets(config), templates, strict=True)
    for index, (where, dataset, template) in enumerate(entries):
        samples, count = tokenize_dataset(dataset, config, tokenizer, template, where, log)
        log(
            f"{where} {dataset.path} ({_type_name(dataset)}): {count.rows_read} rows read, "
            f"{count.kept} kept"
        )
        (train_parts if index < n_train else eval_parts).append(samples)
        counts.append(count)

    train = [s for part in train_parts for s in part]
    if not train:
        raise DataRowError(_empty_message(counts[:n_train], config))
    if config.shuffle_merged_datasets:
        order = np.random.default_rng(config.seed).permutation(len(train))
        train = [train[i] for i in order]
    evaluation = [s for part in eval_parts for s in part] or None
    if evaluation is None and config.val_set_size:
        train, evaluation = _split_off_eval(train, config)

    summary = _summary(counts, train, evaluation, target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _to_dataset(train).save_to_disk(str(tmp / "train"))
        if evaluation:
            _to_dataset(evaluation).save_to_disk(str(tmp / "eval"))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(target, from_cache=False)


def _type_name(dataset: DatasetConfig) -> str:
    return dataset.type if isinstance(dataset.type, str) else "custom format"


def tokenize_dataset(
    dataset: DatasetConfig,
    config: FinetuneConfig,
    tokenizer,
    template: str | None,
    where: str,
    log: Callable[[str], None] = print,
) -> tuple[list[Tokenized], Counts]:
    """One dataset entry: read, format with its strategy, tokenize, apply the length policy."""
    strategy = strategy_for(dataset)
    rows = load_rows(dataset)
    _check_columns(rows.column_names, strategy.fields(dataset), dataset, where)
    end_of_turn = chat_templates.end_of_turn_marker(template, tokenizer) if template else None
    if end_of_turn and len(tokenizer.encode(end_of_turn, add_special_tokens=False)) != 1:
        log(
            f"warning: {where}: the chat template ends turns with {end_of_turn!r}, which is not "
            "one token for this tokenizer (the model would learn it piece by piece); use the "
            "model's own template (chat_template: tokenizer_default) or add it with `tokens:`"
        )
    ctx = Context(
        dataset=dataset,
        config=config,
        tokenizer=tokenizer,
        chat_template=template,
        end_of_turn=end_of_turn,
    )
    counts = Counts()
    samples: list[Tokenized] = []
    row_index = 0
    for batch in rows.iter(batch_size=BATCH_ROWS):
        names = list(batch)
        rendered = []
        for values in zip(*batch.values(), strict=True):
            try:
                rendered.append(strategy.render(dict(zip(names, values, strict=True)), ctx))
            except RowError as exc:
                raise DataRowError(
                    f"{where} {dataset.path}: row {row_index}: {exc} (fields found: "
                    f"{', '.join(names)})"
                ) from None
            row_index += 1
        for offset, (row, sample) in enumerate(
            zip(rendered, tokenize_rendered(rendered, tokenizer), strict=True)
        ):
            index = row_index - len(rendered) + offset
            samples.extend(
                _apply_length_policy(sample, row.split_long, config, counts, where, index, dataset)
            )
    counts.rows_read = row_index
    counts.kept = len(samples)
    return samples, counts


def _check_columns(columns, fields, dataset: DatasetConfig, where: str) -> None:
    required, optional = fields
    missing = [name for name in required if name not in columns]
    if missing:
        expected = ", ".join(required) + (f" (optional: {', '.join(optional)})" if optional else "")
        raise DataRowError(
            f"{where} {dataset.path}: row 0: missing field {', '.join(map(repr, missing))} for "
            f"type {_type_name(dataset)}; fields found: {', '.join(columns) or 'none'}; "
            f"expected: {expected}"
        )


def _apply_length_policy(
    sample: Tokenized, split_long: bool, config, counts: Counts, where, index, dataset
) -> list[Tokenized]:
    limit = config.sequence_len
    pieces = [sample]
    if len(sample.input_ids) > limit:
        if split_long:
            pieces = split_into_chunks(sample, limit)
            counts.chunks_added += len(pieces) - 1
        elif config.excess_length_strategy == "raise":
            raise DataRowError(
                f"{where} {dataset.path}: row {index}: {len(sample.input_ids)} tokens, longer "
                f"than sequence_len {limit}; raise sequence_len or set excess_length_strategy: "
                "drop or truncate"
            )
        elif config.excess_length_strategy == "truncate":
            pieces = [Tokenized(sample.input_ids[:limit], sample.labels[:limit])]
            counts.truncated += 1
        else:
            counts.too_long += 1
            return []
    kept = []
    for piece in pieces:
        if np.any(piece.labels != IGNORE_INDEX):
            kept.append(piece)
        else:
            counts.nothing_to_train += 1
    return kept


def _empty_message(counts: list[Counts], config: FinetuneConfig) -> str:
    read = sum(c.rows_read for c in counts)
    too_long = sum(c.too_long for c in counts)
    nothing = sum(c.nothing_to_train for c in counts)
    return (
        f"datasets: no rows left to train on: {read} read, {too_long} longer than sequence_len "
        f"{config.sequence_len}, {nothing} with no trainable token. Raise sequence_len, use "
        "excess_length_strategy: truncate, or check roles_to_train / the label mask "
        "(finetune preprocess CONFIG --debug)."
    )


def _split_off_eval(train: list[Tokenized], config: FinetuneConfig):
    size = config.val_set_size
    n_eval = int(size) if size >= 1 else max(1, round(size * len(train)))
    if n_eval >= len(train):
        raise DataRowError(
            f"val_set_size: {size} leaves no training rows out of {len(train)}; lower it"
        )
    rng = np.random.default_rng(config.seed + 1)
    chosen = set(rng.choice(len(train), size=n_eval, replace=False).tolist())
    evaluation = [s for i, s in enumerate(train) if i in chosen]
    return [s for i, s in enumerate(train) if i not in chosen], evaluation


def _to_dataset(samples: list[Tokenized]) -> datasets.Dataset:
    lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int32, count=len(samples))
    offsets = np.zeros(len(samples) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([s.input_ids for s in samples])
    labels = np.concatenate([s.labels for s in samples])
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
            "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
            "length": pa.array(lengths),
        }
    )
    return datasets.Dataset(table)


def _stats(samples: list[Tokenized] | None) -> dict:
    if not samples:
        return {"rows": 0}
    lengths = np.array([len(s.input_ids) for s in samples])
    trainable = int(sum(int(np.count_nonzero(s.labels != IGNORE_INDEX)) for s in samples))
    return {
        "rows": len(samples),
        "tokens": int(lengths.sum()),
        "trainable_tokens": trainable,
        "length_min": int(lengths.min()),
        "length_median": float(np.median(lengths)),
        "length_p95": float(np.percentile(lengths, 95)),
        "length_max": int(lengths.max()),
    }


def _summary(counts: list[Counts], train, evaluation, target: Path) -> dict:
    return {
        "rows_read": sum(c.rows_read for c in counts),
        "rows_kept": sum(c.kept for c in counts),
        "dropped_too_long": sum(c.too_long for c in counts),
        "truncated": sum(c.truncated for c in counts),
        "dropped_nothing_to_train": sum(c.nothing_to_train for c in counts),
        "chunks_added": sum(c.chunks_added for c in counts),
        "train": _stats(train),
        "eval": _stats(evaluation),
        "cache": str(target),
    }


def _load(target: Path, from_cache: bool) -> PreparedData:
    summary = json.loads((target / "summary.json").read_text())
    train = datasets.load_from_disk(str(target / "train"))
    eval_dir = target / "eval"
    evaluation = datasets.load_from_disk(str(eval_dir)) if eval_dir.is_dir() else None
    return PreparedData(train, evaluation, target, summary, from_cache)


def format_summary(summary: dict) -> str:
    """The end-of-preprocess report a user reads."""
    train = summary["train"]
    lines = [
        f"rows read {summary['rows_read']}, kept {summary['rows_kept']}, dropped: "
        f"{summary['dropped_too_long']} too long, {summary['dropped_nothing_to_train']} nothing "
        f"to train; truncated {summary['truncated']}, long texts split into "
        f"{summary['chunks_added']} extra chunks",
        f"train: {train['rows']} samples, {train['tokens']} tokens, "
        f"{train['trainable_tokens']} trainable ({train['trainable_tokens'] / train['tokens']:.0%})"
        f"; length min {train['length_min']} / median {train['length_median']:.0f} / p95 "
        f"{train['length_p95']:.0f} / max {train['length_max']}",
    ]
    evaluation = summary["eval"]
    if evaluation["rows"]:
        lines.append(f"eval: {evaluation['rows']} samples, {evaluation['tokens']} tokens")
    lines.append(f"cache: {summary['cache']}")
    return "\n".join(lines)
