"""`completion`: raw text from `field` (default `text`), every token trained, long texts split
into `sequence_len` chunks rather than dropped."""

from __future__ import annotations

from finetune.data.strategies import Context, Rendered, RowError, register


def _field(dataset) -> str:
    return dataset.field or "text"


def fields(dataset) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (_field(dataset),), ()


def render(row: dict, ctx: Context) -> Rendered:
    text = row.get(_field(ctx.dataset))
    if not isinstance(text, str):
        raise RowError(f"field {_field(ctx.dataset)!r} should be text, got {type(text).__name__}")
    return Rendered(text, [(0, len(text))], eos="trained", split_long=True)


def prompt(text: str, ctx: Context) -> tuple[str, bool]:
    return text, True  # the text to continue


register("completion", fields, render, prompt)
