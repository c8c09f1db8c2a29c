"""Prompt strategies: each turns one dataset row into text plus the character spans to train.

A strategy is a small module that calls `register(...)` once per `type:` name it serves.
Tokenization and label masking are shared (finetune/data/tokenize.py): strategies only say
*what text* and *which parts of it* are trained, never touch token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from finetune.config.schema import DatasetConfig, FinetuneConfig


class RowError(ValueError):
    """A row that does not fit its strategy; the caller adds the dataset and row number."""


@dataclass
class Rendered:
    """One row as text: `spans` are the [start, end) character ranges whose tokens are trained."""

    text: str
    spans: list[tuple[int, int]]
    # Let the tokenizer add its BOS: prompt formats want it, chat templates write their own.
    add_special_tokens: bool = True
    # Append the tokenizer's EOS token: trained, masked, or not appended at all.
    eos: Literal["trained", "masked"] | None = None
    # Long rows become several `sequence_len` chunks instead of being dropped (completion).
    split_long: bool = False
    # Chat rows: trained assistant turns, and how many of them end with a trained stop token
    # (the template's end-of-turn marker); for the stop-token audit in preprocess.
    answers: int = 0
    stopped: int = 0


@dataclass
class Context:
    """What a strategy may read besides the row."""

    dataset: DatasetConfig
    config: FinetuneConfig
    tokenizer: Any
    chat_template: str | None = None
    # The texts that end a turn, searched right after each message (eot_tokens, else the
    # template's own end-of-turn marker).
    end_of_turn: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy:
    name: str
    # Fields a row must have (given the dataset's options), and optional ones it may have.
    fields: Callable[[DatasetConfig], tuple[tuple[str, ...], tuple[str, ...]]]
    render: Callable[[dict, Context], Rendered]
    # Inference: a user's text as the prompt this format trains on, and whether the tokenizer
    # adds its special tokens (BOS) as in training; None for conversations (chat templates).
    prompt: Callable[[str, Context], tuple[str, bool]] | None = None


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, fields: Callable, render: Callable, prompt: Callable | None = None) -> None:
    STRATEGIES[name] = Strategy(name, fields, render, prompt)


def strategy_for(dataset: DatasetConfig) -> Strategy:
    """The strategy serving `dataset.type` (a mapping means the user-defined format)."""
    name = dataset.type if isinstance(dataset.type, str) else "user_defined"
    return STRATEGIES[name]


# Importing the modules fills the registry.
from finetune.data.strategies import (  # noqa: E402, F401
    alpaca,
    chat_template,
    completion,
    input_output,
)

DATASET_TYPES = tuple(name for name in STRATEGIES if name != "user_defined")
