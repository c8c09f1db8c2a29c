"""What this machine can run: precision, devices, refusals, warnings, the CPU allocator.

Every setting that depends on the hardware is decided here, so each stage asks one place.
May import: finetune.config and finetune.errors.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import ModelLoadError, TrainingError

if TYPE_CHECKING:  # annotations only: the CLI imports this module before anything else loads
    from finetune.config import FinetuneConfig


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


@cache
def tf32_supported() -> bool:
    """True on CUDA GPUs of the Ampere generation or later."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def resolve_for_machine(
    config: FinetuneConfig,
    *,
    cuda: bool | None = None,
    bf16: bool | None = None,
    tf32: bool | None = None,
) -> FinetuneConfig:
    """The config with every `auto` precision setting decided for this machine (or for the
    capabilities given).

    `bf16: auto` is bf16 where the hardware has it natively (CUDA GPUs with bf16, CPUs with
    AVX512-BF16 or AMX). As in Axolotl, a GPU without bf16 falls back to fp16 mixed precision
    unless `fp16` is set; unlike Axolotl, a CPU without bf16 trains in fp32 (fp16 mixed
    precision needs a GPU). `tf32: auto` is on for Ampere+ GPUs.
    """
    cuda = cuda_available() if cuda is None else cuda
    update = {}
    if config.bf16 == "auto":
        native = bf16_supported() if bf16 is None else bf16
        update["bf16"] = not config.fp16 and native
        if config.fp16 is None:
            update["fp16"] = not update["bf16"] and cuda
    elif config.fp16 is None:
        update["fp16"] = False
    if config.tf32 == "auto":
        update["tf32"] = tf32_supported() if tf32 is None else tf32
    return config.model_copy(update=update) if update else config


def machine_warnings(config: FinetuneConfig) -> list[str]:
    """What in a valid config this machine could not run (validate checks configs, not machines)."""
    warnings = []
    gpu = cuda_available()
    if config.attn_implementation == "flash_attention_2" and not gpu:
        warnings.append("attn_implementation: flash_attention_2 needs a CUDA GPU; none here")
    if config.gradient_checkpointing == "offload" and not gpu:
        warnings.append("gradient_checkpointing: offload needs a CUDA GPU; `train` refuses it here")
    if config.fp16 and not gpu:
        warnings.append("fp16: mixed float16 training needs a CUDA GPU; none here")
    if config.bf16 is True and not bf16_supported():
        warnings.append("bf16: this machine has no native bf16 support; use `bf16: auto`")
    refusal = fsdp_refusal(config, cuda=gpu)
    if refusal:
        warnings.append(f"{refusal} (`train` refuses it)")
    return warnings


def fsdp_refusal(
    config: FinetuneConfig, *, cuda: bool | None = None, launched: bool | None = None
) -> str | None:
    """Why this FSDP config cannot train here, or None.

    FSDP1 is refused everywhere. FSDP2 runs through Accelerate, which (1.15) switches FSDP on
    only for GPU-like devices: on CPU processes it keeps DDP and the HF Trainer trains unsharded
    without a word, so a CPU run is refused (torch's FSDP2 itself runs on CPU with gloo;
    tests/train/test_fsdp.py checks our adapters under it). The HF Trainer also refuses FSDP
    in a process no launcher started (torchrun and accelerate launch set LOCAL_RANK, even for
    one process); `launched` None skips that check (validate).
    """
    if not config.uses_fsdp():
        return None
    if config.fsdp_version != 2:
        return (
            "fsdp: FSDP1 (fsdp_version: 1, Axolotl's default when fsdp_version is unset) is not "
            "supported; set fsdp_version: 2 to shard with FSDP2"
        )
    cuda = cuda_available() if cuda is None else cuda
    if not cuda:
        return (
            "fsdp_version: 2 needs CUDA GPUs: Accelerate shards with FSDP only on GPUs and would "
            "train unsharded on this CPU; use deepspeed: zero3 here"
        )
    if launched is False:
        return (
            "fsdp_version: 2 runs one process per GPU under a launcher: `finetune train CONFIG "
            "--num-processes N` (or torchrun / accelerate launch, also for one GPU)"
        )
    return None


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
    import os

    refusal = fsdp_refusal(config, launched="LOCAL_RANK" in os.environ)
    if refusal:
        raise TrainingError(refusal)
    if config.gradient_checkpointing == "offload" and not torch.cuda.is_available():
        raise TrainingError(
            "gradient_checkpointing: offload parks activations in CPU memory to free GPU "
            "memory; without a CUDA GPU they are in CPU memory already. Use "
            "gradient_checkpointing: true"
        )


def check_one_process_per_gpu(gpus: int | None = None, world_size: int | None = None) -> None:
    """One process that sees several GPUs would fall into torch's DataParallel inside the HF
    Trainer, which splits packed rows and their per-sample boundaries across GPUs: refused, with
    the command that runs one process per GPU."""
    import os

    import torch

    gpus = torch.cuda.device_count() if gpus is None else gpus
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if gpus > 1 and world_size == 1:
        raise ModelLoadError(
            f"this process sees {gpus} GPUs; finetune runs one process per GPU: `finetune train "
            f"CONFIG --num-processes {gpus}` (or accelerate launch / torchrun), or choose one GPU "
            "with CUDA_VISIBLE_DEVICES=0"
        )


def use_huge_pages_for_tensors() -> bool:
    """Ask PyTorch's CPU allocator to back large tensors (2 MB and up) with transparent huge
    pages: it reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so this must run before
    torch is imported. Returns whether it was set (not when torch is already loaded, the user
    set the variable, or the platform is not Linux).

    A CPU step touches gigabytes of fresh activation memory the first time; in 4 KB pages that
    was 2.3 million page faults and 26 s of system time in the first step of the one-epoch bench
    (SmolLM2-135M, 4 x 1024 packed tokens), 314 thousand with huge pages; whole-process wall time
    104-109 s -> 97-105 s, alternating runs (bench/peers.py's epoch data). Kernels whose THP
    setting is "never" ignore the request; GPU memory is not affected."""
    import os
    import sys

    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return False
    if "THP_MEM_ALLOC_ENABLE" in os.environ:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True


# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_UP_TO = 2**31 - 1  # mallopt takes a C int: keep up to 2 GiB


def shards_parameters(config: FinetuneConfig) -> bool:
    """Whether each process holds only a share of the base weights (DeepSpeed ZeRO-3, FSDP):
    such a run gathers each layer's full weights for a moment and must give them back."""
    import json

    if config.uses_fsdp():
        return True
    settings = config.deepspeed
    if isinstance(settings, str):
        try:
            settings = json.loads(Path(settings).read_text())
        except (OSError, ValueError):
            return False  # validation reports an unreadable file
    return bool(settings) and settings.get("zero_optimization", {}).get("stage") == 3


def cpu_allocator_mode(config: FinetuneConfig) -> str:
    """How glibc's malloc should treat memory a CPU training step frees: "keep" or "give back".

    An unsharded run without gradient checkpointing allocates and frees the same large
    activations every step. glibc serves allocations above its mmap threshold (32 MB at most)
    with fresh mappings and returns a free heap top to the OS, so each step page-faults all of
    them in again: on SmolLM2-135M with 2048-token rows, ~230k faults and 1.5-2.5 s of system
    time per 11-13 s step. With both thresholds raised ("keep"), steps after the first few fault
    almost nothing; the process keeps its peak memory until it exits, and the peak grows a
    little (6.3 -> 6.8 GB in bench/train_throughput.py, packed).

    With gradient checkpointing, keeping is the wrong trade: the heap fragments. Each layer's
    recomputed activations are freed between the small tensors the step keeps, and the next
    layer's requests no longer fit the holes, so the heap grows by part of a layer's
    activations per layer: SmolLM2-135M, one 4096-token row, LoRA, 5.5 GB peak RSS for 1.1 GB
    of live tensors. With every large block in its own mapping, given back when freed ("give
    back"), the same step peaks at 1.7 GB, for ~1.6x the step time (the page faults: 28 -> 45 s
    per step there). A run that turns checkpointing on has chosen memory over speed.

    A run that shards its parameters (`shards_parameters`, ZeRO-3) gathers each layer's full
    weights and frees them again; kept in the heap, or in a heap whose mmap threshold glibc
    raises by itself after the first large free, they undo the sharding (bench/zero3_load.py):
    it gives back too.
    """
    if config.gradient_checkpointing or shards_parameters(config):
        return "give back"
    return "keep"


def tune_cpu_allocator(config: FinetuneConfig) -> str | None:
    """CPU training: set glibc's malloc for the kind of run (`cpu_allocator_mode`); returns
    what was set, or None. Skipped on GPUs, without glibc, and when the user tunes malloc
    through GLIBC_TUNABLES or MALLOC_* variables."""
    if cuda_available():
        return None  # the weights live in GPU memory
    mode = cpu_allocator_mode(config)
    return mode if set_cpu_allocator(mode) else None


def set_cpu_allocator(mode: str) -> bool:
    """glibc malloc thresholds for `mode` ("keep" or "give back", see tune_cpu_allocator);
    whether they were set."""
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
    mmap, trim = malloc_thresholds(mode)
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap) and mallopt(_M_TRIM_THRESHOLD, trim))


def malloc_thresholds(mode: str) -> tuple[int, int]:
    """glibc's (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) for "keep" or "give back". A fixed mmap
    threshold also turns off glibc's raising it by itself after a large free."""
    return (128 * 1024, 128 * 1024) if mode == "give back" else (_KEEP_UP_TO // 2, _KEEP_UP_TO)
