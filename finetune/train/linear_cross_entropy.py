"""Cross-entropy of a linear output head without the (tokens x vocab) logits.

`linear_cross_entropy(hidden, weight, targets)` is the summed cross-entropy of
`softcap(scale * (hidden @ weight.T + bias))` against `targets`, computed a chunk of tokens at a
time. Each chunk's logits exist once, in the forward: they give the chunk's loss and, when a
backward can follow, are turned right away into the chunk's gradients (with respect to the
hidden states, and the head's weight and bias where those are trained), then dropped. The
backward only scales those gradients by its incoming gradient. Logits, softmax and gradients
are fp32 whatever the model's dtype; the weight gradient is accumulated in fp32.

Gradients in the forward (as Liger's fused kernel does), not logits recomputed in the backward
(cut-cross-entropy's way): the same memory (a (tokens x hidden) gradient is kept instead of the
hidden states) and one (tokens x hidden x vocab) matmul fewer: the recompute took 1.5x as long
for the loss alone on this CPU (35 s vs 23 s wall, SmolLM2's head, 4,096 tokens, fp32).

Chunk size: at most `CHUNK_LOGITS_BYTES` (128 MiB) of fp32 logits per chunk, i.e.
`128 MiB / (4 bytes * vocab)` tokens: 682 for SmolLM2's 49,152-token vocabulary, 261 for
Llama 3's 128k, 131 for Gemma 2's 256k. One buffer of that size is reused in place (logits,
then softmax, then their gradient); soft-capping adds one for its slope and a bf16 model a
half-size copy for the matmul. On this CPU (SmolLM2's head, 4,096 tokens, fp32, CPU time),
682-token chunks took 0.9x the full-logits path's time and 341-token chunks 1.03x: narrower
matmuls run slower, so the budget is the upper half of what memory alone would suggest.

On CUDA, Liger's fused linear cross-entropy or Apple's cut-cross-entropy kernels are used when
installed (`pip install 'finetune[gpu]'`); the same formula, in fused Triton kernels.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_LOGITS_BYTES = 128 * 2**20

KERNELS = ("auto", "chunked", "liger", "cut-cross-entropy")


def chunk_tokens_for(vocab_size: int, budget_bytes: int = CHUNK_LOGITS_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits fit in `budget_bytes`."""
    return max(1, budget_bytes // (4 * vocab_size))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    chunk_tokens: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of `softcap(scale * (hidden @ weight.T + bias))`.

    hidden (tokens, hidden_size), weight (vocab, hidden_size), targets (tokens,), every target a
    real class (drop ignored positions first). `softcap` is Gemma 2's `tanh(x / c) * c`.
    `kernel`: "auto" (a fused CUDA kernel when one is installed, else chunked), "chunked",
    "liger" or "cut-cross-entropy".
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if kernel == "auto":
        # Liger computes gradients in its forward whether or not they are wanted: evaluation
        # (no grad) takes the chunked path, which then computes the loss only.
        kernel = fused_kernel() if hidden.is_cuda and torch.is_grad_enabled() else "chunked"
        if kernel == "cut-cross-entropy" and bias is not None:
            kernel = "chunked"  # cut-cross-entropy takes no bias
    if kernel == "liger":
        return _liger(hidden, weight, targets, bias, scale, softcap)
    if kernel == "cut-cross-entropy":
        return _cut_cross_entropy(hidden, weight, targets, bias, scale, softcap)
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0])
    # Gradients are computed in the forward only when a backward can follow (not in eval).
    with_grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, float(scale), softcap, int(chunk), with_grads
    )


@functools.cache
def fused_kernel() -> str:
    """The installed fused CUDA kernel ("liger" preferred: its per-chunk matmul is torch's, so
    fp32 stays fp32), else "chunked"."""
    if importlib.util.find_spec("liger_kernel") is not None:
        return "liger"
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        return "cut-cross-entropy"
    return "chunked"


def _chunk_logits(hidden, weight, bias, scale: float, softcap: float | None) -> torch.Tensor:
    """One chunk's final logits in fp32: the head's matmul in its own dtype (as the model's
    forward computes it), then scale and soft-cap in fp32, in place."""
    logits = F.linear(hidden, weight, bias).float()
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap, chunk, with_grads):
        want_hidden, want_weight, want_bias = (
            wanted and with_grads for wanted in ctx.needs_input_grad[:3]
        )
        grads = _Gradients(
            hidden=torch.empty_like(hidden) if want_hidden else None,
            # fp32 accumulators across chunks, cast to the parameters' dtype at the end
            weight=torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if want_weight
            else None,
            bias=torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if bias is not None and want_bias
            else None,
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            # one call per chunk: its buffers are freed before the next chunk's are allocated
            total += _chunk_loss(
                hidden, weight, bias, targets, slice(start, start + chunk), scale, softcap, grads
            )
        ctx.save_for_backward(
            grads.hidden,
            None if grads.weight is None else grads.weight.to(weight.dtype),
            None if grads.bias is None else grads.bias.to(bias.dtype),
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # The loss is linear in its incoming gradient: scale the gradients computed in forward.
        grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None)


@dataclass
class _Gradients:
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _chunk_loss(hidden, weight, bias, targets, rows, scale, softcap, grads: _Gradients):
    """The summed loss of hidden[rows]; adds their gradients into `grads` (those not None)."""
    chunk, chunk_targets = hidden[rows], targets[rows]
    logits = _chunk_logits(chunk, weight, bias, scale, softcap)
    target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
    with_grads = grads.hidden is not None or grads.weight is not None or grads.bias is not None
    slope = None
    if softcap is not None and with_grads:  # d(c tanh(z / c))/dz = 1 - (capped / c)^2
        slope = logits.div(softcap).square_().neg_().add_(1)
    # log-sum-exp in place (no second chunk-sized buffer): the buffer then holds exp(z - max)
    peak = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(peak).exp_()
    sums = exps.sum(dim=-1, keepdim=True)
    loss = (peak + sums.log()).squeeze(1).sub_(target_logits).sum()
    if not with_grads:
        return loss
    # d loss / d final logits = softmax - one_hot(target); then through the cap and the scale
    grad_logits = exps.div_(sums)
    grad_logits[torch.arange(chunk.shape[0], device=chunk.device), chunk_targets] -= 1
    if slope is not None:
        grad_logits.mul_(slope)
    if scale != 1.0:
        grad_logits.mul_(scale)
    if grads.hidden is not None:
        grads.hidden[rows] = grad_logits.to(weight.dtype) @ weight
    if grads.weight is not None:
        grads.weight.addmm_(grad_logits.T, chunk.float())
    if grads.bias is not None:
        grads.bias += grad_logits.sum(dim=0)
    return loss


def _scaled(hidden, bias, scale: float):
    """softcap(s (h W^T + b)) = softcap((s h) W^T + s b): the fused kernels take no scale."""
    if scale == 1.0:
        return hidden, bias
    return hidden * scale, None if bias is None else bias * scale


def _liger(hidden, weight, targets, bias, scale, softcap) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden, bias = _scaled(hidden, bias, scale)
    result = liger_fused_linear_cross_entropy(
        hidden, weight, targets, bias=bias, reduction="sum", softcap=softcap
    )
    # Liger has returned a tensor, a (loss, z_loss) tuple and an output object across versions.
    if isinstance(result, tuple):
        result = result[0]
    return getattr(result, "loss", result).float()


def _cut_cross_entropy(hidden, weight, targets, bias, scale, softcap) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    if bias is not None:
        raise ValueError("cut-cross-entropy takes no bias; use kernel='chunked' or 'liger'")
    hidden, _ = _scaled(hidden, None, scale)
    # cce_exact: no gradient filtering, so the gradients are the reference's, not an estimate.
    loss = cce_linear_cross_entropy(
        hidden, weight, targets, softcap=softcap, reduction="sum", impl="cce_exact"
    )
    return loss.float()
