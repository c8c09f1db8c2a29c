"""The training loss: cross-entropy over trained tokens only, computing logits only there.

In instruction data most tokens are masked prompt tokens; projecting only the kept positions
through the output head (`logits_to_keep`) saves most of the largest matmul and of the softmax.
The sum is divided by the token count of the whole optimizer step (`num_items_in_batch`), so
the loss is the same whether samples are packed, padded or spread over accumulation steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.data.tokenize import IGNORE_INDEX


def kept_token_loss(
    model: torch.nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None
):
    """(loss, model outputs, trained token count) for one micro-batch.

    Position i predicts token i+1, so the kept positions are those whose *next* label is kept.
    """
    labels = inputs["labels"]
    targets_all = labels[:, 1:]
    keep = targets_all != IGNORE_INDEX
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if labels.shape[0] == 1:
        positions = keep[0].nonzero().squeeze(-1)
        targets = targets_all[:, positions]
    else:  # rows share the kept positions: keep the union, mask the rest per row
        positions = keep.any(dim=0).nonzero().squeeze(-1)
        targets = targets_all[:, positions]
    outputs = model(**model_inputs, logits_to_keep=positions, use_cache=False)
    logits = outputs.logits
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = keep.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else count
    return loss_sum / denominator, outputs, count
