"""What this machine can run: precision, devices, refusals, warnings, the CPU allocator.

Every setting that depends on the hardware is decided here, so each stage asks one place.
May import: finetune.config and finetune.errors.
"""

from __future__ import annotations

from functools import cache

from finetune.config import FinetuneConfig
from finetune.errors import ModelLoadError


@cache
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@cache
def bf16_supported() -> bool:
    """True on CUDA GPUs with bf16 and on CPUs with native bf16 (AVX512-BF16 or AMX)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_for_machine(config: FinetuneConfig) -> FinetuneConfig:
    """The config with `bf16: auto` decided for this machine."""
    if config.bf16 == "auto":
        return config.model_copy(update={"bf16": not config.fp16 and bf16_supported()})
    return config


def machine_warnings(config: FinetuneConfig) -> list[str]:
    """What in a valid config this machine could not run (validate checks configs, not machines)."""
    warnings = []
    gpu = cuda_available()
    if config.attn_implementation == "flash_attention_2" and not gpu:
        warnings.append("attn_implementation: flash_attention_2 needs a CUDA GPU; none here")
    if config.fp16 and not gpu:
        warnings.append("fp16: mixed float16 training needs a CUDA GPU; none here")
    if config.bf16 is True and not bf16_supported():
        warnings.append("bf16: this machine has no native bf16 support; use `bf16: auto`")
    if config.fsdp or config.fsdp_config:
        warnings.append("fsdp: not supported by finetune yet; `train` refuses it, use deepspeed")
    return warnings


def check_combinations_for_machine(config: FinetuneConfig) -> None:
    """Combinations known to fail on this stack, refused before anything is loaded."""
    import torch

    if config.load_in_8bit and config.peft_use_dora and not torch.cuda.is_available():
        raise ModelLoadError(
            "load_in_8bit with peft_use_dora fails inside bitsandbytes on CPU; use load_in_4bit "
            "(QLoRA) with DoRA, or plain LoRA on the 8-bit model"
        )
    if config.attn_implementation == "flash_attention_2" and not torch.cuda.is_available():
        raise ModelLoadError(
            "attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on this machine"
        )
    if config.fsdp or config.fsdp_config:
        raise ModelLoadError("fsdp: not supported by finetune yet; use deepspeed (ZeRO-2/3)")


# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_UP_TO = 2**31 - 1  # mallopt takes a C int: keep up to 2 GiB


def keep_freed_memory_for_reuse() -> bool:
    """CPU training: let glibc keep memory a step freed, for the next step, instead of handing
    it back to the OS.

    glibc serves allocations above its mmap threshold (32 MB at most) with fresh mappings and
    returns a free heap top to the OS, so a training step, which allocates and frees the same
    large activations every time, page-faults all of them in again: on SmolLM2-135M with
    2048-token rows, ~230k faults and 1.5-2.5 s of system time per 11-13 s step. With both
    thresholds raised, steps after the first few fault almost nothing. The process keeps its peak
    memory until it exits instead of giving it back between steps, and the peak grows a little
    (6.3 -> 6.8 GB in bench/train_throughput.py, packed). Skipped on GPUs, without glibc, and
    when the user tunes malloc through GLIBC_TUNABLES or MALLOC_* variables. Returns whether it
    was applied.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or cuda_available():
        return False
    if "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        name.startswith("MALLOC_") for name in os.environ
    ):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only (not musl)
    if mallopt is None:
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _KEEP_UP_TO // 2) and mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO)
    )
