"""Per-sample ("variable-length") attention for packed rows, registered with transformers.

A packed row holds several samples. Masked attention over the whole row computes every score
of the (row x row) matrix and throws most away; running attention once per sample computes
only each sample's own (n x n) block, which is what makes packing pay on CPU.

Per sample it computes what the model's own attention computes: causal, the sliding window
the layer passes (`sliding_window`, None on full layers), the model's scaling, grouped-query
heads, logit soft-capping (`softcap`, Gemma 2) and attention sinks (`s_aux`, gpt-oss). Samples
no longer than the window run SDPA with `is_causal`; longer ones SDPA with a boolean band mask;
soft-capping and sinks, which SDPA cannot express, run the same matmul-softmax-matmul as the
model's eager attention. A keyword it does not know is an error, never silently dropped: it
could change what attention computes. Batches without sample boundaries (padded eval batches)
run the same features over the mask transformers built for them.

Registered through transformers' AttentionInterface and mask interface (no monkeypatching);
`finetune.train.attention_choice` decides when a model uses it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from finetune.errors import UnsupportedAttentionError

# No "sdpa" in the name: transformers would then check the model supports SDPA (Gemma 2 does not).
PER_SAMPLE_ATTENTION = "finetune_per_sample"

# Keywords the models pass along (transformers 5.24's TransformersKwargs, and what the decoder
# layers forward) that do not change what attention computes: the sample boundaries (read
# below), positions (already applied by RoPE) and what to return.
_NEUTRAL_KEYWORDS = frozenset(
    {
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
        "position_ids",
        "use_cache",
        "num_items_in_batch",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
    }
)


def per_sample_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention per sample of a packed row (`cu_seq_lens_q` gives the boundaries); else over
    the batch's mask. Query (batch, heads, tokens, dim); returns (batch, tokens, heads, dim)."""
    unknown = sorted(set(kwargs) - _NEUTRAL_KEYWORDS)
    if unknown or is_causal is False:
        what = unknown or ["is_causal=False"]
        raise UnsupportedAttentionError(
            f"sample_packing: {type(module).__name__} passes {', '.join(what)} to its attention, "
            "which finetune's per-sample attention does not compute; set attn_implementation: "
            "eager (the model's own attention over a packed mask) or sample_packing: false"
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or query.shape[0] != 1:
        if softcap is None and s_aux is None:
            # The mask transformers built already holds causality, padding and the window.
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling
            )
        allowed = attention_mask
        if allowed is None and query.shape[2] > 1:  # transformers left causality to is_causal:
            # SDPA's is_causal aligns the query block to the first key
            rows = torch.arange(query.shape[2], device=query.device)[:, None]
            allowed = rows >= torch.arange(key.shape[2], device=query.device)[None, :]
        output = _eager_attention(
            module, query, key, value, allowed, dropout, scaling, softcap, s_aux
        )
        return output.transpose(1, 2).contiguous(), None

    lengths = boundaries.diff().tolist()
    windowed = [n for n in lengths if sliding_window is not None and n > sliding_window]
    plain = softcap is None and s_aux is None
    # One mask for the longest sample that needs one; a shorter sample's is its top-left
    # corner. SDPA needs one only beyond the window; the eager path always does.
    band = _band(max(windowed), sliding_window, query.device) if windowed else None
    causal = None if plain else _band(max(lengths), None, query.device)
    gqa = query.shape[1] != key.shape[1]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[2]
        mask = band[:n, :n] if band is not None and n > sliding_window else None
        if plain:
            return F.scaled_dot_product_attention(
                q, k, v, mask, dropout, is_causal=mask is None, scale=scaling, enable_gqa=gqa
            )
        allowed = mask if mask is not None else causal[:n, :n]
        return _eager_attention(module, q, k, v, allowed, dropout, scaling, softcap, s_aux)

    # split (not one slice per sample): its backward is one cat, where each slice's backward
    # would allocate and zero a gradient of the whole row.
    pieces = (
        attend(q, k, v)
        for q, k, v in zip(
            query.split(lengths, dim=2),
            key.split(lengths, dim=2),
            value.split(lengths, dim=2),
            strict=True,
        )
        if q.shape[2]
    )
    # Straight into the (1, tokens, heads, head_dim) layout the caller wants: one copy, not a
    # cat followed by a transposing copy.
    return torch.cat([piece.transpose(1, 2) for piece in pieces], dim=1), None


@functools.lru_cache(maxsize=4)  # every layer of a forward asks for the same one or two
def _band(n: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(n, n) boolean: query i sees key j when j <= i and, with a window, i - j < window
    (transformers' sliding_window_overlay: the window counts the token itself)."""
    distance = torch.arange(n, device=device)[:, None] - torch.arange(n, device=device)[None, :]
    allowed = distance >= 0
    return allowed & (distance < window) if window is not None else allowed


def _eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    dropout: float,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """What the models' eager attention computes (Gemma 2's soft-capping, gpt-oss' sinks):
    (batch, heads, q, dim). `allowed` is boolean (True = attend) or an additive float mask."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None and allowed.dtype == torch.bool:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    elif allowed is not None:
        scores = scores + allowed
    if sinks is not None:
        # One extra logit per head that takes probability mass but contributes no value.
        column = sinks.reshape(1, -1, 1, 1).to(scores.dtype)
        scores = torch.cat([scores, column.expand(*scores.shape[:-1], 1)], dim=-1)
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if sinks is not None:
        probabilities = probabilities[..., :-1]
    probabilities = F.dropout(probabilities, p=dropout, training=module.training)
    return torch.matmul(probabilities.to(value.dtype), value)


def register_attention() -> str:
    """Make `attn_implementation=PER_SAMPLE_ATTENTION` available; the mask builder treats it
    as SDPA (boolean masks)."""
    AttentionInterface.register(PER_SAMPLE_ATTENTION, per_sample_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PER_SAMPLE_ATTENTION, sdpa_mask)
    return PER_SAMPLE_ATTENTION
