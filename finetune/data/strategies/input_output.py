"""`input_output`: rows of `segments: [{text, label}]`, concatenated as given, with no template
and no special tokens added; only `label: true` segments are trained."""

from __future__ import annotations

from finetune.data.strategies import Context, Rendered, RowError, register


def fields(_dataset) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return ("segments",), ()


def render(row: dict, ctx: Context) -> Rendered:
    segments = row.get("segments")
    if not isinstance(segments, list) or not segments:
        raise RowError("field 'segments' should be a non-empty list of {text, label}")
    text, spans = "", []
    for i, segment in enumerate(segments):
        if not isinstance(segment, dict) or not isinstance(segment.get("text"), str):
            raise RowError(f"segments[{i}] should be a mapping with a `text` string")
        start = len(text)
        text += segment["text"]
        # A segment without `label` is trained (rows read through Arrow carry it as null).
        label = segment.get("label")
        if label is None or label or ctx.config.train_on_inputs:
            spans.append((start, len(text)))
    return Rendered(text, spans, add_special_tokens=False)


def prompt(text: str, ctx: Context) -> tuple[str, bool]:
    return text, False  # segments are used as given, with no special tokens


register("input_output", fields, render, prompt)
