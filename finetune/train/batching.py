"""How the prepared samples become micro-batches: one batch plan per split, and its collator."""

from __future__ import annotations

from collections.abc import Callable

from finetune.config import FinetuneConfig
from finetune.data.packing import BatchPlan, collate_packed, collate_padded


def batch_plans(config: FinetuneConfig, prepared, rank: int, world: int):
    """This rank's training batches and (when there is eval data) eval batches."""
    train_plan = BatchPlan(
        prepared.train["length"],
        config.micro_batch_size,
        config.sequence_len,
        packed=config.sample_packing,
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
            packed=config.eval_sample_packing,
            seed=config.seed,
            shuffle=False,
            rank=rank,
            world_size=world,
        )
    return train_plan, eval_plan


def collator(config: FinetuneConfig, pad_id: int, packed: bool) -> Callable:
    """Samples -> one packed row, or a padded batch (to `sequence_len` with pad_to_sequence_len)."""
    pad_to = config.sequence_len if config.pad_to_sequence_len else None
    if packed:
        width = pad_to * config.micro_batch_size if pad_to else None
        return lambda samples: collate_packed(samples, pad_id, width)
    return lambda samples: collate_padded(samples, pad_id, pad_to)
