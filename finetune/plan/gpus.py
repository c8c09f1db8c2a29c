"""Accelerators `finetune plan --gpu NAME` knows: memory, native bf16, and peak dense
tensor-core throughput in the precision a run trains in (vendor datasheets, no sparsity).

Peak TFLOPs feed the time estimate only, scaled by `ASSUMED_MFU`: a planning figure, not a
measurement. Memory is what the card reports as its total; the plan keeps `HEADROOM` of it free.
"""

from __future__ import annotations

from dataclasses import dataclass

# Fraction of peak throughput a LoRA fine-tuning step reaches on a GPU (model FLOPs utilization):
# an assumption for planning, stated in every GPU time estimate.
ASSUMED_MFU = 0.35
# Fraction of a card's memory a plan may fill: the CUDA context, cuBLAS workspaces and the
# caching allocator's rounding live in the rest.
HEADROOM = 0.9


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16: bool
    tflops_16bit: float  # dense bf16 (fp16 where bf16 is missing)


GPUS = {
    gpu.name.lower(): gpu
    for gpu in (
        Gpu("H200", 141, True, 989),
        Gpu("H100-80GB", 80, True, 989),
        Gpu("H100-PCIe", 80, True, 756),
        Gpu("A100-80GB", 80, True, 312),
        Gpu("A100-40GB", 40, True, 312),
        Gpu("L40S", 48, True, 362),
        Gpu("L4", 24, True, 121),
        Gpu("A10", 24, True, 125),
        Gpu("RTX-4090", 24, True, 165),
        Gpu("RTX-3090", 24, True, 71),
        Gpu("V100-32GB", 32, False, 125),
        Gpu("T4", 16, False, 65),
    )
}
ALIASES = {"h100": "h100-80gb", "a100": "a100-80gb", "4090": "rtx-4090", "3090": "rtx-3090"}


def find_gpu(name: str) -> Gpu | None:
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    return GPUS.get(ALIASES.get(key, key))


def gpu_names() -> str:
    return ", ".join(gpu.name for gpu in GPUS.values())


def this_gpu() -> Gpu | None:
    """The CUDA device this process trains on, for a memory-only plan (`train`'s): memory and
    bf16 as the device reports them; no throughput (a memory plan has no time)."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return Gpu(
        properties.name, properties.total_memory / 2**30, torch.cuda.is_bf16_supported(), 0.0
    )
