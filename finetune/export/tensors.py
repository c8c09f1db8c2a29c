"""The merged checkpoint, tensor by tensor, without loading it.

Shapes come from the safetensors headers; each tensor is read on its own when it is written, so
memory holds one tensor (and its encoded copy) at a time, never a whole shard or model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.errors import ExportError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    name: str
    shard: Path
    shape: tuple[int, ...]


def stored_tensors(folder: Path) -> list[StoredTensor]:
    """Every tensor of the safetensors checkpoint in `folder`, shard by shard."""
    shards = _shard_files(folder)
    found = []
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as handle:
                names = handle.keys()  # safe_open handles are not iterable
                for name in names:
                    shape = tuple(handle.get_slice(name).get_shape())
                    found.append(StoredTensor(name, shard, shape))
        except Exception as exc:  # safetensors raises its own error types for broken files
            raise ExportError(f"{shard}: not a readable safetensors file ({exc})") from None
    return found


def _shard_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text()).get("weight_map", {})
        return [folder / name for name in dict.fromkeys(sorted(weight_map.values()))]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise ExportError(
        f"{folder}: no {SINGLE} or {INDEX}; export reads a merged safetensors checkpoint "
        "(run `finetune merge CONFIG --force` to write it again)"
    )


def read_tensors(tensors: list[StoredTensor]) -> Iterator[tuple[StoredTensor, torch.Tensor]]:
    """Each tensor's values, in the given order, keeping one shard open at a time."""
    for shard, group in groupby(tensors, key=lambda tensor: tensor.shard):
        with safe_open(shard, framework="pt") as handle:
            for tensor in group:
                yield tensor, handle.get_tensor(tensor.name)
