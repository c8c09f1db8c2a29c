"""`finetune preprocess`: datasets -> tokenized, label-masked, cached training and eval sets.

Each dataset entry is read (sources.py), rendered by its prompt strategy (strategies/),
tokenized and masked (tokenize.py) and put through the length policy; the training rows are
shuffled together, an eval split is taken off, and the result is cached (cache.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from finetune.config import DatasetConfig, FinetuneConfig
from finetune.data import chat_templates
from finetune.data.cache import (
    PreparedData,
    cache_key,
    cache_lock,
    is_complete,
    read_prepared,
    write_prepared,
)
from finetune.data.sources import load_rows
from finetune.data.strategies import Context, RowError, strategy_for
from finetune.data.summary import Counts, empty_message, summarize
from finetune.data.tokenize import IGNORE_INDEX, Tokenized, split_into_chunks, tokenize_rendered
from finetune.errors import DataRowError

BATCH_ROWS = 2000


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
    root, key = _cache_place(config, tokenizer, templates)
    target = root / key
    with cache_lock(root, key):
        if is_complete(target):
            prepared = read_prepared(target, from_cache=True)
            log(f"Using the prepared data in {target} (inputs unchanged).")
        else:
            prepared = _build(config, tokenizer, templates, target, log)
    # The template the run trains with: the config's, else the (single) one the datasets used.
    used = {t for t in templates if t}
    prepared.chat_template = global_template or (used.pop() if len(used) == 1 else None)
    return prepared


def cached_prepared(config: FinetuneConfig, tokenizer) -> PreparedData | None:
    """The prepared data from the cache when every input is unchanged; None otherwise
    (nothing is prepared)."""
    templates = [_template_for(d, config, tokenizer) for d in _all_datasets(config)]
    root, key = _cache_place(config, tokenizer, templates)
    if not is_complete(root / key):
        return None
    return read_prepared(root / key, from_cache=True)


def _cache_place(config: FinetuneConfig, tokenizer, templates) -> tuple[Path, str]:
    key = cache_key(config, tokenizer, list(zip(_all_datasets(config), templates, strict=True)))
    return Path(config.dataset_prepared_path), key


def _all_datasets(config: FinetuneConfig) -> list[DatasetConfig]:
    return [*config.datasets, *(config.test_datasets or [])]


def _template_choice(dataset: DatasetConfig, config: FinetuneConfig) -> tuple[str, str | None]:
    """(template name, Jinja text or path) a chat dataset uses: its own keys, then the
    config's; a Jinja template, where one is given, wins over any name."""
    name = dataset.chat_template or config.chat_template or "tokenizer_default"
    return name, dataset.chat_template_jinja or config.chat_template_jinja


def _template_for(dataset: DatasetConfig, config: FinetuneConfig, tokenizer) -> str | None:
    if dataset.type != "chat_template":
        return None
    return chat_templates.resolve_chat_template(*_template_choice(dataset, config), tokenizer)


def _build(config, tokenizer, templates, target: Path, log) -> PreparedData:
    n_train = len(config.datasets)
    names = [f"datasets[{i}]" for i in range(n_train)]
    names += [f"test_datasets[{i}]" for i in range(len(config.test_datasets or []))]
    train_parts, eval_parts, counts = [], [], []
    entries = zip(names, _all_datasets(config), templates, strict=True)
    for index, (where, dataset, template) in enumerate(entries):
        samples, count = tokenize_dataset(dataset, config, tokenizer, template, where, log)
        log(
            f"{where} {dataset.path} ({dataset.type_name}): {count.rows_read} rows read, "
            f"{count.kept} kept"
        )
        (train_parts if index < n_train else eval_parts).append(samples)
        counts.append(count)

    train = [s for part in train_parts for s in part]
    if not train:
        raise DataRowError(empty_message(counts[:n_train], config.sequence_len))
    if config.shuffle_merged_datasets:
        order = np.random.default_rng(config.seed).permutation(len(train))
        train = [train[i] for i in order]
    evaluation = [s for part in eval_parts for s in part] or None
    if evaluation is None and config.val_set_size:
        train, evaluation = _split_off_eval(train, config)

    summary = summarize(counts, train, evaluation, target)
    summary["templates"] = [
        f"{where}: {chat_templates.describe(_template_name(dataset, config), template, tokenizer)}"
        for where, dataset, template in zip(names, _all_datasets(config), templates, strict=True)
        if template
    ]
    write_prepared(
        target, _to_dataset(train), _to_dataset(evaluation) if evaluation else None, summary
    )
    return read_prepared(target, from_cache=False)


def _template_name(dataset: DatasetConfig, config: FinetuneConfig) -> str:
    name, jinja = _template_choice(dataset, config)
    return "your chat_template_jinja" if jinja else name


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
    markers = _end_of_turn_markers(config, template, tokenizer, where, log)
    ctx = Context(
        dataset=dataset,
        config=config,
        tokenizer=tokenizer,
        chat_template=template,
        end_of_turn=markers,
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
                    f"{where} {dataset.path}: row {row_index + 1}: {exc} (fields found: "
                    f"{', '.join(names)})"
                ) from None
            row_index += 1
        for offset, (row, sample) in enumerate(
            zip(rendered, tokenize_rendered(rendered, tokenizer), strict=True)
        ):
            index = row_index - len(rendered) + offset
            kept = _apply_length_policy(
                sample, row.split_long, config, counts, where, index, dataset
            )
            samples.extend(kept)
            if len(kept) == 1 and len(kept[0].input_ids) == len(sample.input_ids):
                answers, stopped = _stops(row, tokenizer)
                counts.answers += answers
                counts.stopped += stopped
    if counts.answers and not counts.stopped:
        raise DataRowError(_no_stop_message(where, dataset, config, markers))
    counts.rows_read = row_index
    counts.kept = len(samples)
    return samples, counts


def _end_of_turn_markers(config, template, tokenizer, where, log) -> tuple[str, ...]:
    """What ends a turn: `eot_tokens`, else the template's own end-of-turn marker."""
    if config.eot_tokens:
        return tuple(config.eot_tokens)
    if not template:
        return ()
    marker = chat_templates.end_of_turn_marker(template, tokenizer)
    if marker and len(tokenizer.encode(marker, add_special_tokens=False)) != 1:
        log(
            f"warning: {where}: the chat template ends turns with {marker!r}, which is not "
            "one token for this tokenizer (the model would learn it piece by piece); use the "
            "model's own template (chat_template: tokenizer_default) or add it with `tokens:`"
        )
    return (marker,) if marker else ()


def _stops(row, tokenizer) -> tuple[int, int]:
    """(answers, answers ending with a trained stop token) of one rendered row."""
    if row.eos == "trained":
        return 1, int(tokenizer.eos_token_id is not None)
    if row.eos == "masked":
        return 1, 0
    return row.answers, row.stopped


def _no_stop_message(where, dataset: DatasetConfig, config, markers) -> str:
    name = _template_name(dataset, config) if dataset.type == "chat_template" else dataset.type_name
    looked = f" (looked for {', '.join(map(repr, markers))} after each answer)" if markers else ""
    return (
        f"{where} {dataset.path}: no answer ends with a trained stop token{looked}, so the model "
        f"would never learn to stop; with {name}, set train_on_eos: turn, name the token that "
        "ends a turn with eot_tokens, or use a template that writes one "
        "(chat_template: tokenizer_default)"
    )


def _check_columns(columns, fields, dataset: DatasetConfig, where: str) -> None:
    required, optional = fields
    missing = [name for name in required if name not in columns]
    if missing:
        expected = ", ".join(required) + (f" (optional: {', '.join(optional)})" if optional else "")
        raise DataRowError(
            f"{where} {dataset.path}: row 1: missing field {', '.join(map(repr, missing))} for "
            f"type {dataset.type_name}; fields found: {', '.join(columns) or 'none'}; "
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
                f"{where} {dataset.path}: row {index + 1}: {len(sample.input_ids)} tokens, longer "
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
