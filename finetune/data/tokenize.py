"""Rendered rows -> `input_ids` and `labels`, masking by character offsets.

Each row is tokenized as one text by the fast (Rust) tokenizer, in batches; a token is trained
when it overlaps one of the row's trained character spans. Label -100 means "not trained".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.data.strategies import Rendered

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained


def tokenize_rendered(rows: list[Rendered], tokenizer) -> list[Tokenized]:
    """Tokenize a batch of rendered rows (one Rust call per add_special_tokens setting)."""
    backend = tokenizer.backend_tokenizer
    eos_id = tokenizer.eos_token_id
    out: list[Tokenized | None] = [None] * len(rows)
    for add_special in (True, False):
        indices = [i for i, r in enumerate(rows) if r.add_special_tokens is add_special]
        if not indices:
            continue
        encodings = backend.encode_batch(
            [rows[i].text for i in indices], add_special_tokens=add_special
        )
        for i, encoding in zip(indices, encodings, strict=True):
            out[i] = _label(rows[i], encoding, eos_id)
    return out


def _label(row: Rendered, encoding, eos_id: int | None) -> Tokenized:
    ids = np.asarray(encoding.ids, dtype=np.int32)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for start, end in row.spans:
        first, last = _token_range(encoding, start, end)
        labels[first:last] = ids[first:last]
    if row.eos is not None and eos_id is not None:
        # A tokenizer whose post-processor already ends every text with EOS has written it
        # (covering no character, so it is unlabelled): label that one; never append a second.
        added = len(ids) > 0 and ids[-1] == eos_id and encoding.offsets[-1] == (0, 0)
        if not added:
            ids = np.append(ids, np.int32(eos_id))
            labels = np.append(labels, np.int32(IGNORE_INDEX))
        labels[-1] = eos_id if row.eos == "trained" else IGNORE_INDEX
    if len(labels):
        # The first token is never predicted (nothing comes before it). Masking it also keeps a
        # packed row from predicting a sample's first token from the previous sample.
        labels[0] = IGNORE_INDEX
    return Tokenized(ids, labels)


def _token_range(encoding, start: int, end: int) -> tuple[int, int]:
    """Tokens [first, last) that overlap the characters [start, end).

    A token merged across the span's edge is trained: a prompt ending in a space ("Answer: ")
    hands the space to the response's first token (" Paris"), which must still be learned.
    Looks up only the span's two ends (the encoding maps characters to tokens in Rust), so the
    cost does not grow with the row's length. Special tokens the tokenizer added itself (BOS)
    cover no character and are never trained.
    """
    first = None
    for char in range(start, end):
        first = encoding.char_to_token(char)
        if first is not None:
            break
    if first is None:
        return 0, 0
    last = None
    for char in range(end - 1, start - 1, -1):
        last = encoding.char_to_token(char)
        if last is not None:
            break
    return first, max(first, last + 1)


def split_into_chunks(sample: Tokenized, length: int) -> list[Tokenized]:
    """Cut a long sample into pieces of at most `length` tokens (completion data)."""
    pieces = []
    for start in range(0, len(sample.input_ids), length):
        labels = sample.labels[start : start + length].copy()
        labels[0] = IGNORE_INDEX
        pieces.append(Tokenized(sample.input_ids[start : start + length], labels))
    return pieces
