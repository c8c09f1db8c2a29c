"""Which attention a model trains with, and whether its batches are packed: one decision.

`choose_attention` reads the config and the base model's own config (before the weights load)
and returns the implementation to load the model with, whether training and eval batches are
packed rows, and a line saying why. The model loading, the batch plans, the collators and the
attention all take it from here.

Packed rows are exact in one of two ways:
- per sample (`finetune.train.attention`): causal, sliding window per layer, scaling, GQA,
  soft-capping and sinks, each sample's own block only. The default: packing's speed-up.
- the model's own attention over the block-diagonal mask transformers derives from the rows'
  `position_ids` (no attention_mask, no cache): for what only the mask carries (Llama 4's
  chunked attention), or when `attn_implementation: eager` asks for it. Exact, but every row
  computes all of its (row x row) scores.
A model whose mask builder does not see `position_ids` (gpt-oss in transformers 5.24) never gets
a packed mask, so it packs only per sample; a model neither way fits is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import FinetuneConfig
from finetune.errors import PackingError
from finetune.model.load import text_config
from finetune.train.attention import PER_SAMPLE_ATTENTION

# Model types whose attention mask is built without `position_ids` (transformers 5.24), so
# transformers cannot isolate packed samples in it; only the per-sample path keeps them apart.
MASK_IGNORES_PACKING = frozenset({"gpt_oss"})
# Layer types the per-sample attention reproduces; any other comes only through the mask.
PER_SAMPLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str  # `attn_implementation` the model is loaded with
    packed: bool  # training batches are packed rows
    eval_packed: bool  # eval batches are packed rows
    reason: str  # one line for the start of the run


def choose_attention(config: FinetuneConfig, model_config) -> AttentionChoice:
    """The attention implementation and packing for this config and this base model."""
    requested = config.attn_implementation or "sdpa"
    packed, eval_packed = bool(config.sample_packing), bool(config.eval_sample_packing)
    text = text_config(model_config)
    family = getattr(text, "model_type", None) or getattr(model_config, "model_type", "model")
    features = _features(text)
    own = _own_attention(model_config, requested)

    def choice(implementation: str, reason: str) -> AttentionChoice:
        return AttentionChoice(implementation, packed, eval_packed, f"{family}: {reason}")

    if not (packed or eval_packed):
        if own != requested:
            return choice(own, f"its model class does not support {requested}; {own} attention")
        return choice(own, f"{own} attention{features}, padded batches")
    if requested == "flash_attention_2":
        return choice(
            requested,
            f"flash-attention runs packed rows as variable-length sequences{features}",
        )
    if getattr(text, "use_bidirectional_attention", False):
        raise PackingError(
            f"sample_packing: {family} is configured with bidirectional attention, which "
            "finetune cannot isolate per packed sample; set sample_packing: false"
        )
    mask_only = sorted(set(getattr(text, "layer_types", None) or ()) - PER_SAMPLE_LAYER_TYPES)
    if getattr(text, "attention_chunk_size", None) and not mask_only:
        mask_only = ["chunked_attention"]
    mask_isolates = family not in MASK_IGNORES_PACKING
    if mask_only:
        if not mask_isolates:
            raise PackingError(
                f"sample_packing: {family} has {', '.join(mask_only)} layers, which only its "
                "mask carries, and its mask cannot isolate packed samples; set "
                "sample_packing: false"
            )
        return choice(
            own,
            f"{', '.join(mask_only)} comes only through the mask, so packed rows use the "
            f"model's own {own} attention over a block-diagonal mask (exact, but each row "
            "computes all row x row scores)",
        )
    if requested == "eager" and mask_isolates:
        return choice(
            "eager",
            "attn_implementation: eager: packed rows use the model's own eager attention over "
            "a block-diagonal mask (exact, slower than per-sample attention)",
        )
    if requested == "eager":
        return choice(
            PER_SAMPLE_ATTENTION,
            "its mask cannot isolate packed samples, so packed rows attend per sample "
            f"instead of eager{features}",
        )
    return choice(PER_SAMPLE_ATTENTION, f"packed rows attend per sample{features}")


def _features(text) -> str:
    """What the model's attention computes besides causal attention, in words."""
    parts = []
    window = getattr(text, "sliding_window", None)
    layer_types = list(getattr(text, "layer_types", None) or ())
    if window and not layer_types:
        parts.append(f"sliding window {window}")
    elif window and "sliding_attention" in layer_types:
        sliding = layer_types.count("sliding_attention")
        parts.append(f"sliding window {window} on {sliding} of {len(layer_types)} layers")
    if getattr(text, "attn_logit_softcapping", None):
        parts.append(f"soft-capping {text.attn_logit_softcapping:g}")
    return f" (causal + {' + '.join(parts)})" if parts else " (causal)"


def _own_attention(model_config, requested: str) -> str:
    """`requested`, or eager where the model's class does not support sdpa (Gemma 2, gpt-oss)."""
    if requested != "sdpa":
        return requested
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:  # remote code or an unknown config: let transformers decide
        return requested
    return "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"
