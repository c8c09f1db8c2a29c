"""How the prepared samples become micro-batches: one batch plan per split, and its collator."""

from __future__ import annotations

from collections.abc import Callable

from finetune.config import FinetuneConfig
from finetune.data.packing import BatchPlan, collate_packed, collate_padded
from finetune.train.attention_choice import AttentionChoice


def batch_plans(
    config: FinetuneConfig, prepared, attention: AttentionChoice, rank: int, world: int
):
    """This rank's training batches and (when there is eval data) eval batches, packed as
    `attention` decided."""
    train_plan = BatchPlan(
        prepared.train["length"],
        config.micro_batch_size,
        config.sequence_len,
        packed=attention.packed,
        seed=config.seed,
        rank=rank,
        world_size=world,
    )
    eval_plan = None
    if prepared.eval is not None:
        eval_plan = BatchPlan(
            prepared.eval["length"],
            config.eval_batch_size or config.micro_batch_size,
            config.sequence_len,
            packed=attention.eval_packed,
            seed=config.seed,
            shuffle=False,
            rank=rank,
            world_size=world,
            every_sample=True,
        )
    return train_plan, eval_plan


def collator(config: FinetuneConfig, pad_id: int, packed: bool) -> Callable:
    """Samples -> one packed row, or a padded batch (to `sequence_len` with pad_to_sequence_len)."""
    pad_to = config.sequence_len if config.pad_to_sequence_len else None
    if packed:
        width = pad_to * config.micro_batch_size if pad_to else None
        return lambda samples: collate_packed(samples, pad_id, width)
    return lambda samples: collate_padded(samples, pad_id, pad_to)
