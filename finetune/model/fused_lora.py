"""LoRA's update added inside one matrix product.

peft's plain LoRA layer computes `result + lora_B(lora_A(dropout(x))) * scaling`: B's product,
then a multiplication by `scaling` and an addition, each a pass over the layer's whole
(tokens x out_features) output, and in the backward pass one more multiplication of the
incoming gradient by `scaling`. `FusedLoraLinear` computes the same sum as one
`addmm(result, A(x), B^T, alpha=scaling)`: the scaling and the addition happen inside the
product. In fp32 the two differ by rounding only; in bf16 they round at different places and
are equally close to the fp32 computation (tests/model/test_fused_lora.py, against peft's own
layer on three model families).

SmolLM2-135M, LoRA r16 on every linear layer, 4 x 1024 packed tokens, bf16 autocast on a
2-core AMD EPYC: in one profiled step the multiplications and additions took 0.34 s of CPU time
instead of 0.49 s; `finetune train` of bench/peers.py's one-epoch config took 86.7 / 89.8 s
against 91.8 / 93.2 s with peft's forward (start to exit, runs alternating; part of that gap is
run-to-run noise), with the same final loss.

Only peft's plain `lora.Linear` with one active adapter, no DoRA (or other variant), no LoRA
bias and no per-call arguments takes this path; everything else (a disabled or merged adapter,
`adapter_names`, several adapters at once, weights of mixed dtypes outside autocast) runs
peft's own forward. Not for runs that shard
parameters (ZeRO-3, FSDP): B's weight is read directly, outside the module call that gathers it.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


class FusedLoraLinear(LoraLinear):
    """peft's `lora.Linear` whose plain-LoRA forward adds the update inside B's product."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args or kwargs else self._plain_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
        low_rank = lora_a(self.lora_dropout[adapter](x))
        update = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            low_rank.reshape(-1, low_rank.shape[-1]),
            lora_b.weight.t(),
            alpha=self.scaling[adapter],
        )
        return update.view(result.shape).to(result.dtype)

    def _plain_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter when it is plain LoRA without bias on an unmerged layer, and
        one addmm can take the operands: under autocast, or with base and adapter weights of
        one dtype (a bf16 model outside autocast meets float32 adapters: peft's sum)."""
        if self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        if not torch.is_autocast_enabled(x.device.type):
            weights = (self.get_base_layer(), self.lora_A[name], self.lora_B[name])
            if len({layer.weight.dtype for layer in weights}) != 1:
                return None
        return name


def fuse_lora_updates(model: torch.nn.Module) -> int:
    """Give every plain peft `lora.Linear` in `model` the fused forward (its class becomes the
    subclass `FusedLoraLinear`: parameters, state dict, merging and saving are peft's).
    Returns how many layers changed."""
    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            changed += 1
    return changed
