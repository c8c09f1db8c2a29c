"""The merge plan: every output tensor with its source and final shape, grouped into output
shards that never span two input shards, and the config.json changes the merge implies."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.errors import MergeError
from finetune.merge.adapter_file import Adapter
from finetune.merge.checkpoint import ModelLayout, TensorInfo


@dataclass(frozen=True)
class OutputTensor:
    name: str
    source: str  # checkpoint tensor it starts from
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class MergePlan:
    shards: list[tuple[Path, list[OutputTensor]]]  # (input shard, tensors) per output shard
    config_changes: dict  # for config.json: dtype, vocab_size, tie_word_embeddings

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for _, tensors in self.shards for t in tensors)


def plan_output(
    checkpoint: dict[str, TensorInfo],
    adapter: Adapter,
    layout: ModelLayout,
    names: dict[str, str],
    out_dtype: torch.dtype,
    max_shard_size: str | int,
) -> MergePlan:
    """Every output tensor with its source and final shape, grouped into output shards."""
    limit = parse_size(max_shard_size)
    touched = adapter.names()
    sources = {name: name for name in checkpoint}
    config_changes: dict = {}
    for tied, partner in layout.tied.items():
        tied_name, partner_name = names[tied], names.get(partner, partner)
        # A tied weight the adapter changes (or whose partner it changes) must be written out on
        # its own: peft computed them separately, so the merged model cannot share them.
        if {tied_name, partner_name} & touched:
            sources.setdefault(tied_name, partner_name)
            config_changes["tie_word_embeddings"] = False

    shapes = {}
    for name, source in sources.items():
        shapes[name] = output_shape(name, checkpoint[source].shape, adapter, layout, names)
    check_vocab(shapes, layout, names, config_changes, adapter)
    config_changes["dtype"] = str(out_dtype).removeprefix("torch.")
    config_changes["torch_dtype"] = config_changes["dtype"]  # only where the base has this key

    by_shard: dict[Path, list[OutputTensor]] = {}
    for name, source in sources.items():
        info = checkpoint[source]
        dtype = out_dtype if info.dtype.is_floating_point else info.dtype
        by_shard.setdefault(info.shard, []).append(OutputTensor(name, source, dtype, shapes[name]))
    shards = []
    for shard, tensors in by_shard.items():  # output shards never span two input shards
        group: list[OutputTensor] = []
        size = 0
        for tensor in tensors:
            if group and size + tensor.nbytes > limit:
                shards.append((shard, group))
                group, size = [], 0
            group.append(tensor)
            size += tensor.nbytes
        shards.append((shard, group))
    return MergePlan(shards, config_changes)


def output_shape(
    name: str, base_shape: tuple, adapter: Adapter, layout: ModelLayout, names: dict
) -> tuple[int, ...]:
    """The merged tensor's shape; refuses adapter tensors whose shapes do not fit the base."""
    where = adapter.weights_file
    embeddings = {names.get(layout.input_embedding), names.get(layout.output_embedding)}
    for replacement in (adapter.base_layers.get(name), adapter.saved_modules.get(name)):
        if replacement is None:
            continue
        same_width = tuple(replacement.shape[1:]) == tuple(base_shape[1:])
        if tuple(replacement.shape) != tuple(base_shape) and not (
            name in embeddings and same_width
        ):
            raise MergeError(
                f"{where}: {name} has shape {tuple(replacement.shape)}, the base "
                f"{tuple(base_shape)}; is this adapter for a different base model?"
            )
        base_shape = tuple(replacement.shape)
    update = adapter.updates.get(name)
    if update is not None:
        delta_shape = (update.lora_B.shape[0], update.lora_A.shape[1])
        if update.fan_in_fan_out:
            delta_shape = delta_shape[::-1]
        if tuple(delta_shape) != tuple(base_shape):
            raise MergeError(
                f"{where}: the update of {name} has shape {tuple(delta_shape)}, the base weight "
                f"{tuple(base_shape)}; is this adapter for a different base model?"
            )
        out_features = delta_shape[1] if update.fan_in_fan_out else delta_shape[0]
        if update.magnitude is not None and update.magnitude.numel() != out_features:
            raise MergeError(f"{where}: the DoRA magnitude of {name} does not fit the weight")
    return tuple(base_shape)


def check_vocab(
    shapes: dict, layout: ModelLayout, names: dict, config_changes: dict, adapter: Adapter
) -> None:
    """Record the merged vocabulary size; input and output embeddings must agree on it."""
    rows = {
        role: shapes[names[weight]][0]
        for role, weight in (("input", layout.input_embedding), ("output", layout.output_embedding))
        if weight in names and names[weight] in shapes
    }
    if len(set(rows.values())) > 1:
        raise MergeError(
            f"{adapter.weights_file}: the input embedding has {rows['input']} rows but the output "
            f"embedding {rows['output']}; when adding tokens, put both embed_tokens and lm_head "
            "in lora_modules_to_save"
        )
    if rows:
        config_changes["vocab_size"] = next(iter(rows.values()))


def parse_size(size: str | int) -> int:
    """ "5GB" -> 5_000_000_000, "2GiB" -> 2**31 (the Hugging Face convention)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise MergeError(f"max_shard_size {size!r}: write a size like 5GB, 500MB or 2GiB")
    unit = (match.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    return int(float(match.group(1)) * (1024 if "I" in unit else 1000) ** power)
