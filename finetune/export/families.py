"""Model families: which llama.cpp architecture a checkpoint becomes, the hyperparameters that
architecture reads, and how tensors change on the way.

Tensor names come from the `gguf` package's own tables (`get_tensor_name_map`), never from a list
of ours. Two value changes follow llama.cpp's converter, and transformers' GGUF reader undoes
both (modeling_gguf_pytorch_utils.py), which the tests use as the independent check:

- Llama and Mistral: q/k projection rows are permuted from the Hugging Face rotary layout
  (halves) to llama.cpp's (interleaved pairs); `LlamaTensorProcessor` permutes them back.
- Gemma 3: RMSNorm computes `x * (1 + w)`; llama.cpp stores `1 + w`, `Gemma2TensorProcessor`
  subtracts 1 again. The sum is taken in float64 and stored in float32, so the round trip
  returns `w` to the float32 rounding of `1 + w` (half a unit in its last place, |1 + w|·2^-24;
  llama.cpp's converter rounds the same way).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from finetune.errors import ExportError

# Checkpoint name prefixes of multimodal wrappers -> the text model's names.
TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
SKIPPED_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.")
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Family:
    name: str
    arch: gguf.MODEL_ARCH
    activation: str  # the hidden_act llama.cpp hard-codes for this architecture
    permute_qk: bool = False
    norm_offset: float = 0.0

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


LLAMA = Family("Llama", gguf.MODEL_ARCH.LLAMA, "silu", permute_qk=True)
FAMILIES = {
    "llama": LLAMA,
    # llama.cpp converts Mistral (v0.1-v0.3, Nemo) as the llama architecture.
    "mistral": Family("Mistral", gguf.MODEL_ARCH.LLAMA, "silu", permute_qk=True),
    "qwen2": Family("Qwen2", gguf.MODEL_ARCH.QWEN2, "silu"),
    "gemma3_text": Family("Gemma 3", gguf.MODEL_ARCH.GEMMA3, "gelu_pytorch_tanh", norm_offset=1.0),
}
FAMILIES["gemma3"] = FAMILIES["gemma3_text"]  # Gemma3ForConditionalGeneration: its text model


def family_for(config) -> tuple[Family, Any]:
    """The family of a transformers config, and its text config (multimodal models' text part)."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ExportError(
            f"model type {config.model_type!r} cannot be exported to GGUF yet; supported: "
            + ", ".join(sorted(FAMILIES))
        )
    text = config.get_text_config()
    activation = getattr(text, "hidden_act", None) or getattr(text, "hidden_activation", None)
    if activation != family.activation:
        raise ExportError(
            f"{config.model_type}: hidden activation {activation!r}, but llama.cpp's "
            f"{family.arch_name} architecture computes {family.activation}; the exported model "
            "would compute something else"
        )
    return family, text


def head_dim(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def rope_parameters(text) -> dict:
    """The rope settings of the full-attention layers (Gemma 3 keeps one set per layer type)."""
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if "full_attention" in rope:
        rope = dict(rope["full_attention"])
    return rope


def write_hyperparameters(writer: gguf.GGUFWriter, family: Family, text, vocab_size: int):
    """The architecture keys llama.cpp reads, and transformers' GGUF reader maps back."""
    heads = text.num_attention_heads
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(text, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(text))
    writer.add_key_length(head_dim(text))
    writer.add_value_length(head_dim(text))
    writer.add_vocab_size(vocab_size)
    rope = rope_parameters(text)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    _write_rope_scaling(writer, rope)
    if family.arch == gguf.MODEL_ARCH.GEMMA3:
        _write_gemma3(writer, text)


def _write_rope_scaling(writer: gguf.GGUFWriter, rope: dict) -> None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind in ("default", "llama3"):  # llama3's factors travel as the rope_freqs tensor
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    else:
        raise ExportError(f"rope scaling {kind!r} cannot be written to GGUF by finetune yet")


def _write_gemma3(writer: gguf.GGUFWriter, text) -> None:
    if getattr(text, "attn_logit_softcapping", None) is not None:
        raise ExportError("Gemma 3 with attn_logit_softcapping: llama.cpp's gemma3 has none")
    if getattr(text, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(text.final_logit_softcapping))
    writer.add_sliding_window(int(text.sliding_window))
    # llama.cpp hard-codes what these config keys say for the published Gemma 3 models.
    layer_types = getattr(text, "layer_types", None) or []
    expected = [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
        for i in range(len(layer_types))
    ]
    if layer_types != expected:
        raise ExportError(
            "Gemma 3 with a layer_types pattern other than 5 sliding + 1 full: llama.cpp "
            "assumes that pattern"
        )
    sliding = (getattr(text, "rope_parameters", None) or {}).get("sliding_attention", {})
    if (
        float(sliding.get("rope_theta", 10000.0)) != 10000.0
        or sliding.get("rope_type", "default") != "default"
    ):
        raise ExportError(
            "Gemma 3 with sliding-window rope other than theta 10000, unscaled: llama.cpp "
            "hard-codes that"
        )
    # llama.cpp scales queries by 1/sqrt(head_dim), and by 1/sqrt(hidden/heads) for the 27B.
    scalars = {head_dim(text)}
    if text.num_hidden_layers == 62:
        scalars.add(text.hidden_size // text.num_attention_heads)
    if text.query_pre_attn_scalar not in scalars:
        raise ExportError(
            f"Gemma 3 with query_pre_attn_scalar {text.query_pre_attn_scalar} != head_dim "
            f"{head_dim(text)}: llama.cpp scales queries by 1/sqrt(head_dim)"
        )


class TensorNames:
    """Checkpoint tensor names -> GGUF names, through the gguf package's table for the arch."""

    def __init__(self, family: Family, block_count: int):
        self.family = family
        self.table = gguf.get_tensor_name_map(family.arch, block_count)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for a tensor the file does not carry (vision tower, buffers)."""
        for old, new in TEXT_PREFIXES:
            if hf_name.startswith(old):
                hf_name = new + hf_name[len(old) :]
        if hf_name.startswith(SKIPPED_PREFIXES) or hf_name.endswith(SKIPPED_SUFFIXES):
            return None
        stem, dot, suffix = hf_name.rpartition(".")
        name = self.table.get_name(stem) if dot else None
        if name is None:
            raise ExportError(
                f"tensor {hf_name}: no GGUF name in the {self.family.arch_name} architecture; "
                "this checkpoint's layout is not one llama.cpp knows"
            )
        return f"{name}.{suffix}"


def gguf_values(hf_name: str, tensor: torch.Tensor, family: Family, text) -> torch.Tensor:
    """A checkpoint tensor as the float32 values llama.cpp expects (module doc)."""
    values = tensor.to(torch.float32)
    if family.permute_qk and re.search(r"\.(q|k)_proj\.(weight|bias)$", hf_name):
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        values = _permute_rotary(values, heads if ".q_proj." in hf_name else kv_heads)
    if family.norm_offset and hf_name.endswith("norm.weight"):
        values = (values.to(torch.float64) + family.norm_offset).to(torch.float32)
    return values


def _permute_rotary(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotary layout (two halves per head) -> llama.cpp's (interleaved pairs);
    llama.cpp's convert_hf_to_gguf.py `permute`."""
    shape = weights.shape
    return (
        weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
        .contiguous()
    )


def llama3_rope_factors(text) -> torch.Tensor | None:
    """The `rope_freqs` tensor llama.cpp applies for Llama 3.1+ rope scaling (None otherwise):
    per frequency, the divisor transformers' `_compute_llama3_parameters` applies."""
    rope = rope_parameters(text)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    dim = head_dim(text)
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)
