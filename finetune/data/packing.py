"""Batches: sample packing (bins of `sequence_len` tokens) or plain padding, and their collators.

Packed samples never attend to each other: a packed micro-batch is one flat row whose
`position_ids` restart at 0 for every sample, with no `attention_mask`, plus the sample
boundaries (`cu_seq_lens_*`) so attention can run per sample (see finetune/attention.py).
Labels keep -100 on each sample's first token (set at tokenization), so no sample is ever
trained to predict its first token from the previous one.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from finetune.data.tokenize import IGNORE_INDEX
from finetune.errors import PackingError


def pack_into_bins(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Best-fit decreasing: longest samples first, each into the bin it fills most tightly.

    Best-fit decreasing needs no more bins than first-fit decreasing and runs in O(n log n)
    with a sorted list of remaining capacities. Ties in length are broken by a seeded shuffle,
    so the same seed always gives the same bins.
    """
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sample of {lengths.max()} tokens does not fit a bin of {capacity}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(lengths)), -lengths))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for index in order.tolist():
        size = int(lengths[index])
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            remaining, bin_index = free.pop(slot)
        else:
            remaining, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if remaining - size > 0:
            bisect.insort(free, (remaining - size, bin_index))
    return bins


def packing_efficiency(lengths: Sequence[int], bins: list[list[int]], capacity: int) -> float:
    """Real tokens / token slots of the packed rows."""
    return float(np.sum(lengths)) / max(1, len(bins) * capacity)


class BatchPlan:
    """The micro-batches of every epoch, known before training starts.

    Packed: the bins are made once from `seed` and re-shuffled every epoch; each micro-batch is
    `micro_batch_size` bins. Padded: samples are re-shuffled every epoch; each micro-batch is
    `micro_batch_size` samples; the last micro-batch of an epoch may be smaller. With several
    processes, each rank gets the same number of micro-batches, built from disjoint samples.

    Training drops the at most world_size - 1 groups left over (a different few each epoch).
    Evaluation (`every_sample=True`) drops nothing: ranks short of a group get a padding group,
    a copy of a real one whose index is offset by the number of samples (PaddedSamples); its
    tokens are never counted, so every sample is evaluated exactly once and every rank runs the
    same number of batches (ZeRO-3's forward is a collective).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        micro_batch_size: int,
        capacity: int,
        packed: bool,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        every_sample: bool = False,
    ):
        self.lengths = np.asarray(lengths)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        if packed:
            self.groups = pack_into_bins(self.lengths, capacity, seed)
            self.efficiency = packing_efficiency(self.lengths, self.groups, capacity)
        else:
            self.groups = [[i] for i in range(len(self.lengths))]
            self.efficiency = None
        if every_sample:
            self.groups_per_rank = math.ceil(len(self.groups) / world_size)
        else:
            self.groups_per_rank = len(self.groups) // world_size
        if self.groups_per_rank == 0:
            raise PackingError(
                f"{len(self.groups)} {'packed rows' if packed else 'samples'} cannot give each of "
                f"{world_size} processes a batch; add data or use fewer processes"
            )
        self.dropped_groups = max(0, len(self.groups) - self.groups_per_rank * world_size)
        self.batches_per_rank = math.ceil(self.groups_per_rank / micro_batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[list[int]]:
        order = np.arange(len(self.groups))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))
        size = self.micro_batch_size
        mine = order[self.rank :: self.world_size][: self.groups_per_rank].tolist()
        groups = [self.groups[g] for g in mine]
        offset = len(self.lengths)
        while len(groups) < self.groups_per_rank:  # evaluation: pad with a copy, never counted
            groups.append([i + offset for i in self.groups[order[0]]])
        for start in range(0, len(groups), size):
            yield [i for group in groups[start : start + size] for i in group]


class PaddedSamples:
    """A dataset that also answers a BatchPlan's padding indices: a copy of the sample they
    stand for, with every label masked (so it trains and counts nothing)."""

    def __init__(self, dataset, ignore_index: int = IGNORE_INDEX):
        self.dataset, self.ignore_index = dataset, ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if index < len(self.dataset):
            return self.dataset[index]
        sample = dict(self.dataset[index - len(self.dataset)])
        sample["labels"] = [self.ignore_index] * len(sample["labels"])
        return sample


def collate_packed(
    samples: list[dict], pad_token_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor | int]:
    """One flat row: samples concatenated, positions restarting at 0, sample boundaries given.

    With `pad_to`, the row is padded to that length; the padding is its own "sample" (its own
    positions and boundary), so it is attended by nothing real and trains nothing.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    input_ids = [t for s in samples for t in s["input_ids"]]
    labels = [t for s in samples for t in s["labels"]]
    positions = [p for n in lengths for p in range(n)]
    total = len(input_ids)
    if pad_to is not None and pad_to > total:
        extra = pad_to - total
        input_ids += [pad_token_id] * extra
        labels += [IGNORE_INDEX] * extra
        positions += list(range(extra))
        lengths.append(extra)
    boundaries = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    longest = max(lengths)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def collate_padded(
    samples: list[dict], pad_token_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """A (batch, longest) batch, right-padded, with an attention mask."""
    longest = max(len(s["input_ids"]) for s in samples)
    width = max(longest, pad_to or 0)
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        ids[row, :n] = torch.as_tensor(sample["input_ids"])
        labels[row, :n] = torch.as_tensor(sample["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def steps_per_epoch(plan: BatchPlan, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one epoch (a last partial accumulation still makes a step)."""
    return math.ceil(len(plan) / gradient_accumulation_steps)
