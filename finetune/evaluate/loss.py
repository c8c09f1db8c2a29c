"""Held-out loss: the mean cross-entropy over every trained token of the eval samples
(token-weighted, each sample counted once), computed by training's own kept-token loss, so it is
the number training's `eval_loss` reports for the same data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from finetune.data.packing import collate_padded
from finetune.evaluate.progress import progress_bar
from finetune.evaluate.samples import EvalSample
from finetune.train.loss import kept_token_loss


@dataclass
class HeldOutLoss:
    loss: float
    perplexity: float
    tokens: int


def held_out_loss(
    model, samples: list[EvalSample], pad_id: int, batch_size: int = 8, label: str = "loss"
) -> HeldOutLoss:
    """Sum of the trained tokens' losses over all samples, divided by their count."""
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    # Samples of similar length share a batch: less padding, the same sums.
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in progress_bar(batches, label):
            rows = [{"input_ids": samples[i].input_ids, "labels": samples[i].labels} for i in batch]
            inputs = collate_padded(rows, pad_id)
            loss_sum, _, count = kept_token_loss(
                model, {k: v.to(device) for k, v in inputs.items()}, num_items_in_batch=1
            )
            total += float(loss_sum.double())
            tokens += int(count)
    loss = total / tokens
    return HeldOutLoss(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens)
