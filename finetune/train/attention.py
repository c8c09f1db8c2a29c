"""Per-sample ("variable-length") SDPA for packed rows, registered with transformers.

A packed row holds several samples. Masked SDPA over the whole row computes every score of the
(row x row) matrix and throws most away; running SDPA once per sample computes only each
sample's own (n x n) causal block, which is what makes packing pay on CPU. Registered through
transformers' AttentionInterface (no monkeypatching); batches without sample boundaries (padded
eval batches, generation) fall through to the stock SDPA path with its mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN_SDPA = "finetune_varlen_sdpa"


def varlen_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA per sample of a packed row (`cu_seq_lens_q` gives the boundaries); else stock SDPA."""
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    lengths = boundaries.diff().tolist()
    # split (not one slice per sample): its backward is one cat, where each slice's backward
    # would allocate and zero a gradient of the whole row.
    pieces = (
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
        )
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


def register_attention() -> str:
    """Make `attn_implementation=VARLEN_SDPA` available; the mask builder treats it as SDPA."""
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)
    return VARLEN_SDPA
