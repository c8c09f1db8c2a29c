"""`finetune preprocess --debug`: show each token of a few samples, trained vs masked."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from finetune.data.tokenize import IGNORE_INDEX


def show_label_mask(samples, tokenizer, count: int, console: Console) -> None:
    """Print `count` samples token by token: trained tokens green, masked tokens dim.

    Without colours (a pipe, NO_COLOR) the trained runs are wrapped in ⟦ ⟧ instead.
    """
    console.print(
        Text("legend: ", style="bold")
        + Text("trained", style="bold green")
        + " / "
        + Text("masked", style="dim")
    )
    color = console.color_system is not None
    for index in range(min(count, len(samples))):
        ids, labels = samples[index]["input_ids"], samples[index]["labels"]
        line = Text()
        in_trained = False
        for token_id, label in zip(ids, labels, strict=True):
            trained = label != IGNORE_INDEX
            piece = tokenizer.decode([token_id])
            if not color and trained != in_trained:
                line.append("⟦" if trained else "⟧")
            in_trained = trained
            line.append(piece, style="green" if trained else "dim")
        if not color and in_trained:
            line.append("⟧")
        n_trained = sum(1 for label in labels if label != IGNORE_INDEX)
        console.rule(f"sample {index}: {len(ids)} tokens, {n_trained} trained")
        console.print(line, markup=False, highlight=False)
