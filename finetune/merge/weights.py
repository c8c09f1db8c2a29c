"""The weight maths: W + scale * B @ A (LoRA, rsLoRA), DoRA's renormalised form, and the nf4
round trip that reproduces what a QLoRA layer computed with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.merge.adapter_file import Adapter, LoraUpdate
from finetune.merge.checkpoint import ModelLayout, shard_reader
from finetune.merge.plan import OutputTensor


@dataclass(frozen=True)
class Nf4Settings:
    """How training quantized the base: which weights, and the dtype it computed in."""

    weights: frozenset[str]  # output names of the weights bitsandbytes quantized
    conv1d: frozenset[str]
    compute_dtype: torch.dtype
    double_quant: bool

    @classmethod
    def for_layout(
        cls, layout: ModelLayout, names: dict, compute_dtype: torch.dtype, double_quant: bool
    ) -> Nf4Settings:
        return cls(
            weights=frozenset(names[n] for n in layout.quantized_4bit if n in names),
            conv1d=frozenset(names[n] for n in layout.conv1d if n in names),
            compute_dtype=compute_dtype,
            double_quant=double_quant,
        )


def merge_lora_shard(
    shard: Path,
    tensors: list[OutputTensor],
    adapter: Adapter,
    nf4: Nf4Settings | None = None,
) -> dict[str, torch.Tensor]:
    """The output tensors of one shard, each read from the base and merged in fp32."""
    read = shard_reader(shard)
    merged = {}
    for out in tensors:
        if out.name in adapter.saved_modules:
            tensor = adapter.saved_modules[out.name]
        else:
            tensor = adapter.base_layers.get(out.name)
            if tensor is None:
                tensor = adapter.base_layers.get(out.source)
            if tensor is None:
                tensor = read(out.source)
            if nf4 and out.source in nf4.weights:
                tensor = nf4_roundtrip(tensor, nf4, conv1d=out.source in nf4.conv1d)
            if out.name in adapter.updates:
                tensor = merge_lora_weight(tensor, adapter.updates[out.name])
            if out.name in adapter.bias_deltas:
                tensor = tensor.float() + adapter.bias_deltas[out.name]
        merged[out.name] = tensor.to(out.dtype).contiguous()
    return merged


def merge_lora_weight(weight: torch.Tensor, update: LoraUpdate) -> torch.Tensor:
    """W + scale * B @ A in fp32, or DoRA's m * (W + sBA) / ||W + sBA|| per output row."""
    weight = weight.float()
    if update.fan_in_fan_out:  # weight is (in, out): add (B @ A).T = A.T @ B.T
        merged = torch.addmm(weight, update.lora_A.T, update.lora_B.T, alpha=update.scale)
    else:
        merged = torch.addmm(weight, update.lora_B, update.lora_A, alpha=update.scale)
    if update.magnitude is None:
        return merged
    # peft (DoraLinearLayer.get_weight_norm) takes the L2 norm of each output row of the
    # (out, in) weight; with fan_in_fan_out those rows are our columns.
    row_dim = 0 if update.fan_in_fan_out else 1
    norm = torch.linalg.norm(merged, dim=row_dim, keepdim=True)
    magnitude = update.magnitude.view_as(norm)
    return merged * (magnitude / norm)


def nf4_roundtrip(weight: torch.Tensor, nf4: Nf4Settings, conv1d: bool) -> torch.Tensor:
    """The weight a QLoRA layer computed with: nf4 in blocks of 64, dequantized, compute dtype."""
    import bitsandbytes.functional as bnb

    # transformers quantizes Conv1D weights as (out, in), like nn.Linear's
    oriented = weight.T.contiguous() if conv1d else weight.contiguous()
    packed, state = bnb.quantize_4bit(
        oriented, blocksize=64, compress_statistics=nf4.double_quant, quant_type="nf4"
    )
    restored = bnb.dequantize_4bit(packed, state).to(nf4.compute_dtype).float()
    return restored.T if conv1d else restored
