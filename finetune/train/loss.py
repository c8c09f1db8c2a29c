"""The training loss: cross-entropy over trained tokens only, never holding the full logits.

In instruction data most tokens are masked prompt tokens; only the kept positions go through
the output head (`logits_to_keep`). Of those, the logits are never materialised either: the
model's forward stops at the head's input and `linear_cross_entropy` computes the loss and its
gradients a chunk of tokens at a time (finetune.train.linear_cross_entropy; on CUDA a fused
kernel when installed). Where the head is not a plain linear map the loss can reproduce
(finetune.train.output_head says which), it falls back to the model's own logits at the kept
positions. Both paths give the same loss and gradients.

The sum is divided by the token count of the whole optimizer step (`num_items_in_batch`), so
the loss is the same whether samples are packed, padded or spread over accumulation steps.

To compare against the old path (bench/), set `FINETUNE_LOSS=full_logits` in the environment
or pass `path="full_logits"`; no config key changes it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from finetune.data.tokenize import IGNORE_INDEX
from finetune.train.linear_cross_entropy import linear_cross_entropy
from finetune.train.output_head import head_input_taken, output_head

LOSS_PATHS = ("chunked", "full_logits")


def kept_token_loss(
    model: torch.nn.Module,
    inputs: dict,
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    path: str | None = None,
    chunk_tokens: int | None = None,
):
    """(loss, model outputs, trained token count) for one micro-batch.

    Position i predicts token i+1, so the kept positions are those whose *next* label is kept.
    `path`: "chunked" (the default where the head allows it) or "full_logits"; unset, the
    FINETUNE_LOSS environment variable decides. `chunk_tokens` overrides the chunk size.
    """
    path = path or os.environ.get("FINETUNE_LOSS") or "chunked"
    if path not in LOSS_PATHS:
        raise ValueError(f"loss path must be one of {LOSS_PATHS}, not {path!r}")
    labels = inputs["labels"]
    targets_all = labels[:, 1:]
    keep = targets_all != IGNORE_INDEX
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if labels.shape[0] == 1:
        positions = keep[0].nonzero().squeeze(-1)
    else:  # rows share the kept positions: keep the union, mask the rest per row
        positions = keep.any(dim=0).nonzero().squeeze(-1)
    targets = targets_all[:, positions]
    count = keep.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else count

    head = output_head(model) if path == "chunked" else None
    if head is None:
        outputs = model(**model_inputs, logits_to_keep=positions, use_cache=False)
        logits = outputs.logits
        loss_sum = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss_sum / denominator, outputs, count

    with head_input_taken(head) as taken:
        outputs = model(**model_inputs, logits_to_keep=positions, use_cache=False)
    hidden = taken[0]  # (batch, kept positions, hidden size)
    targets = targets.to(hidden.device)
    trained = targets != IGNORE_INDEX
    loss_sum = linear_cross_entropy(
        hidden[trained],
        head.weight,
        targets[trained],
        head.bias,
        scale=head.scale,
        softcap=head.softcap,
        chunk_tokens=chunk_tokens,
    )
    return loss_sum / denominator, outputs, count
