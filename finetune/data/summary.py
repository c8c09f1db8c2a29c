"""What preprocessing did, counted per dataset and summed into the report a user reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.data.tokenize import IGNORE_INDEX, Tokenized


@dataclass
class Counts:
    rows_read: int = 0
    kept: int = 0
    too_long: int = 0
    truncated: int = 0
    nothing_to_train: int = 0
    chunks_added: int = 0
    answers: int = 0  # trained answers (assistant turns, responses) in rows kept whole
    stopped: int = 0  # of them, those ending with a trained stop token


def split_stats(samples: list[Tokenized] | None) -> dict:
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


def summarize(counts: list[Counts], train, evaluation, target: Path) -> dict:
    return {
        "rows_read": sum(c.rows_read for c in counts),
        "rows_kept": sum(c.kept for c in counts),
        "dropped_too_long": sum(c.too_long for c in counts),
        "truncated": sum(c.truncated for c in counts),
        "dropped_nothing_to_train": sum(c.nothing_to_train for c in counts),
        "chunks_added": sum(c.chunks_added for c in counts),
        "answers": sum(c.answers for c in counts),
        "answers_with_stop": sum(c.stopped for c in counts),
        "train": split_stats(train),
        "eval": split_stats(evaluation),
        "cache": str(target),
    }


def empty_message(counts: list[Counts], sequence_len: int) -> str:
    """Why no training row is left, and what to change."""
    read = sum(c.rows_read for c in counts)
    too_long = sum(c.too_long for c in counts)
    nothing = sum(c.nothing_to_train for c in counts)
    return (
        f"datasets: no rows left to train on: {read} read, {too_long} longer than sequence_len "
        f"{sequence_len}, {nothing} with no trainable token. Raise sequence_len, use "
        "excess_length_strategy: truncate, or check roles_to_train / the label mask "
        "(finetune preprocess CONFIG --debug)."
    )


def format_summary(summary: dict) -> str:
    """The end-of-preprocess report a user reads."""
    train = summary["train"]
    lines = [
        f"rows read {summary['rows_read']}, kept {summary['rows_kept']}, dropped: "
        f"{summary['dropped_too_long']} too long, {summary['dropped_nothing_to_train']} nothing "
        f"to train; truncated {summary['truncated']}, long texts split into "
        f"{summary['chunks_added']} extra chunks",
        f"train: {_count(train['rows'], 'sample')}, {train['tokens']} tokens, "
        f"{train['trainable_tokens']} trainable ({train['trainable_tokens'] / train['tokens']:.0%})"
        f"; length min {train['length_min']} / median {train['length_median']:.0f} / p95 "
        f"{train['length_p95']:.0f} / max {train['length_max']}",
    ]
    evaluation = summary["eval"]
    if evaluation["rows"]:
        lines.append(f"eval: {_count(evaluation['rows'], 'sample')}, {evaluation['tokens']} tokens")
    if summary.get("answers"):
        lines.append(
            f"trained stop tokens: {summary['answers_with_stop']:,} of {summary['answers']:,} "
            "answers"
        )
    lines += summary.get("templates", [])
    lines.append(f"cache: {summary['cache']}")
    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
