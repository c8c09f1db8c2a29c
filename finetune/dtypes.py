"""Names of dtypes, in one place: `bf16`/`fp16`/`fp32` and their aliases, and safetensors'
header names; and bitsandbytes' 4-bit layers kept computing in the dtype asked for."""

from __future__ import annotations

import torch

from finetune.errors import FinetuneError

# Short name -> torch dtype; the short names are what configs, commands and reports say.
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The dtype names safetensors headers use.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
}


def short_dtype_name(name: str | torch.dtype) -> str | None:
    """ "bfloat16", "torch.bfloat16", torch.bfloat16 or "bf16" -> "bf16"; None when not a float
    dtype we train or write in."""
    text = str(name).removeprefix("torch.")
    text = _ALIASES.get(text, text)
    return text if text in FLOAT_DTYPES else None


def torch_dtype_named(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """The torch dtype for any spelling of bf16/fp16/fp32; a clear error otherwise."""
    short = short_dtype_name(name)
    if short is None:
        raise FinetuneError(f"{what} {name!r} is not one of bf16, fp16, fp32")
    return FLOAT_DTYPES[short]


def keep_4bit_layers_in_compute_dtype(model) -> None:
    """Make bitsandbytes' 4-bit layers compute as configured on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer's weights for a bf16
    kernel the first time it runs in eval mode without gradients, and keeps them repacked. The
    eval logits then come out in bf16 whatever `bnb_4bit_compute_dtype` says, and, worse, once a
    layer is repacked, training goes on through that kernel, which has no backward: gradients
    through the frozen 4-bit weights are dropped silently after the first evaluation (measured:
    LoRA gradients off by more than their own size). We turn the repacking off."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
