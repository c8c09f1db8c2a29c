"""`preprocess --debug`: every token with its id and label, readable without colour."""

from __future__ import annotations

import io

from rich.console import Console

from finetune.data.mask_view import show_label_mask
from finetune.data.tokenize import IGNORE_INDEX


def test_each_token_shows_text_id_and_label_without_colour(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Question: sky?\nAnswer: blue", add_special_tokens=False)
    answer_starts = len(
        smollm2_tokenizer.encode("Question: sky?\nAnswer:", add_special_tokens=False)
    )
    labels = [IGNORE_INDEX] * answer_starts + ids[answer_starts:]
    out = io.StringIO()
    console = Console(file=out, no_color=True, width=200, color_system=None)
    show_label_mask([{"input_ids": ids, "labels": labels}], smollm2_tokenizer, 1, console)
    text = out.getvalue()
    assert text.startswith("legend: each token is text(id, label); label -100 = masked")
    assert f"sample 0: {len(ids)} tokens, {len(ids) - answer_starts} trained" in text
    first = smollm2_tokenizer.decode([ids[0]])
    assert f"{first}({ids[0]}, -100)" in text
    last = smollm2_tokenizer.decode([ids[-1]])
    assert f"{last}({ids[-1]}, {ids[-1]})" in text
    assert "\\n(" in text  # a newline token is shown escaped, on the same line
