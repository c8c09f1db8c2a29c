"""`finetune preprocess --debug`: a few samples token by token, as the model sees them.

Each token is shown as `text(id, label)`, like Axolotl's debug view: the label is the token id
when the token is trained and -100 when it is masked. Trained tokens are also green; the labels
say the same without colour (a pipe, NO_COLOR).
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from finetune.data.tokenize import IGNORE_INDEX

LEGEND = (
    "legend: each token is text(id, label); label -100 = masked (the model is not trained to "
    "predict it), label = id = trained (green)"
)


def show_label_mask(samples, tokenizer, count: int, console: Console) -> None:
    """Print `count` samples, one token after another with its id and label."""
    console.print(Text(LEGEND, style="bold"), highlight=False)
    for index in range(min(count, len(samples))):
        ids, labels = samples[index]["input_ids"], samples[index]["labels"]
        line = Text()
        for token_id, label in zip(ids, labels, strict=True):
            trained = label != IGNORE_INDEX
            piece = tokenizer.decode([token_id]).replace("\n", "\\n")
            line.append(f"{piece}({token_id}, {label}) ", style="green" if trained else "dim")
        n_trained = sum(1 for label in labels if label != IGNORE_INDEX)
        console.rule(f"sample {index}: {len(ids)} tokens, {n_trained} trained")
        console.print(line, markup=False, highlight=False)
