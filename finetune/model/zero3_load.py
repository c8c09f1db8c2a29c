"""ZeRO-3 loading: the base model created partitioned, then filled from its checkpoint a few
tensors at a time, so that no process (rank 0 included) ever holds the whole model.

transformers' own ZeRO-3 loader creates the model partitioned as well, but rank 0 first reads
every checkpoint shard into one state dict. The shards are memory-mapped, and every page it
copies stays resident until the last layer is loaded, so rank 0 peaks at its partition plus the
whole checkpoint: about what a DDP process holds. Here rank 0 reads each tensor with plain file
reads (nothing stays mapped), and DeepSpeed's `GatheredParameters(..., modifier_rank=0)` (its
documented way to change a ZeRO-3 parameter) broadcasts the values into every partition.

Only plain checkpoints take this path: local safetensors files whose tensor names and shapes are
exactly the model's parameters. Anything else (keys transformers renames or fuses, remote code,
modules kept in fp32 in a half-precision run, missing or extra tensors) goes through
transformers' loader, which knows how to convert it, and the log says why.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.dtypes import SAFETENSORS_DTYPES

# Tensors gathered and broadcast together: fewer collectives, bounded memory on every rank.
GROUP_BYTES = 128 * 2**20


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(shard: Path) -> list[StoredTensor]:
    """The tensors of one safetensors file, in file order, from its header alone."""
    with open(shard, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    data_start = 8 + length
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        tensors.append(
            StoredTensor(
                name,
                shard,
                SAFETENSORS_DTYPES[entry["dtype"]],
                tuple(entry["shape"]),
                data_start + begin,
                data_start + end,
            )
        )
    return sorted(tensors, key=lambda tensor: tensor.start)


def read_tensor(tensor: StoredTensor) -> torch.Tensor:
    """One tensor's values, read into ordinary memory (freed when the tensor is)."""
    buffer = bytearray(tensor.end - tensor.start)
    with open(tensor.shard, "rb", buffering=0) as handle:
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            got = os.preadv(handle.fileno(), [view[done:]], tensor.start + done)
            if got == 0:
                raise OSError(f"{tensor.shard}: ends inside tensor {tensor.name}")
            done += got
    if not buffer:
        return torch.empty(tensor.shape, dtype=tensor.dtype)
    return torch.frombuffer(buffer, dtype=tensor.dtype).reshape(tensor.shape)


def stored_tensors(folder: Path) -> list[StoredTensor] | None:
    """Every tensor of the safetensors checkpoint in `folder`, shard by shard; None when the
    folder holds no safetensors checkpoint (a Hub id, pickled weights)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = [folder / name for name in dict.fromkeys(sorted(weight_map.values()))]
    elif (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    else:
        return None
    return [tensor for shard in shards for tensor in read_safetensors_header(shard)]


def why_not_partitioned(model, tensors: list[StoredTensor], dtype: torch.dtype) -> str | None:
    """Why this checkpoint cannot be copied name for name into this model; None when it can."""
    params = dict(model.named_parameters())
    stored = {tensor.name: tensor for tensor in tensors}
    if dtype != torch.float32 and (
        getattr(model, "_keep_in_fp32_modules", None)
        or getattr(model, "_keep_in_fp32_modules_strict", None)
    ):
        return f"{type(model).__name__} keeps some modules in fp32"
    extra = sorted(stored.keys() - params.keys())
    if extra:
        return f"the checkpoint's {extra[0]!r} is not a parameter of the model by that name"
    missing = sorted(params.keys() - stored.keys())
    if missing:
        return f"the checkpoint has no {missing[0]!r}"
    for name, param in params.items():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if stored[name].shape != shape:
            return f"{name!r} is {list(stored[name].shape)} in the checkpoint, {list(shape)} here"
    return None


def fill_partitioned(model, tensors: list[StoredTensor]) -> None:
    """Copy every stored tensor into the partitioned model: rank 0 reads, DeepSpeed broadcasts.
    Every rank walks the same groups in the same order (the collectives must match)."""
    import deepspeed
    import torch.distributed as dist

    params = dict(model.named_parameters())
    reader = dist.get_rank() == 0
    for group in _groups(tensors):
        targets = [params[tensor.name] for tensor in group]
        with deepspeed.zero.GatheredParameters(targets, modifier_rank=0), torch.no_grad():
            if reader:
                for tensor, param in zip(group, targets, strict=True):
                    param.data.copy_(read_tensor(tensor))


def _groups(tensors: list[StoredTensor]) -> list[list[StoredTensor]]:
    groups: list[list[StoredTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.end - tensor.start > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.end - tensor.start
    return [group for group in groups if group]


def load_partitioned(folder: Path, model_config, dtype: torch.dtype, attn_implementation, log):
    """The model created partitioned (zero.Init) and filled shard by shard; None, with the
    reason logged, when only transformers' own loader can read this checkpoint."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tensors = stored_tensors(folder)
    if tensors is None:
        log(f"ZeRO-3: {folder} has no safetensors checkpoint; transformers loads it on rank 0")
        return None
    # from_config initializes the weights at random before they are overwritten: that must not
    # move the random state the adapter's initial weights are drawn from next (with
    # from_pretrained they are drawn from the same state as without ZeRO-3).
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        model = AutoModelForCausalLM.from_config(
            model_config, dtype=dtype, attn_implementation=attn_implementation
        )
    reason = why_not_partitioned(model, tensors, dtype)
    if reason is not None:
        log(f"ZeRO-3: {reason}; transformers loads the checkpoint (rank 0 reads all of it)")
        return None
    fill_partitioned(model, tensors)
    shards = len({tensor.shard for tensor in tensors})
    log(
        f"ZeRO-3: {len(tensors)} tensors from {shards} checkpoint file(s) copied into the "
        "partitions, one group at a time"
    )
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model
