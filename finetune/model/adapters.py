"""PEFT adapters from the config: LoRA, QLoRA, DoRA, rsLoRA."""

from __future__ import annotations

import re

import torch

from finetune.config import FinetuneConfig
from finetune.errors import AdapterError


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of every linear layer except the output head."""
    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__
        if is_linear and module is not output and "lm_head" not in name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def target_modules(config: FinetuneConfig, model: torch.nn.Module) -> str | list[str] | None:
    """What PEFT should adapt: plain names as a list, or one regex when any entry is a regex."""
    entries = list(config.lora_target_modules or [])
    if config.lora_target_linear:
        entries += [n for n in linear_module_names(model) if n not in entries]
    if not entries:
        return None  # PEFT's defaults for the architecture (e.g. q_proj, v_proj)
    if all(re.fullmatch(r"[\w.]+", e) for e in entries):
        return entries
    # PEFT takes a single string as a full-match regex over module paths.
    parts = [e if not re.fullmatch(r"[\w.]+", e) else rf"(?:.*\.)?{re.escape(e)}" for e in entries]
    return "(" + "|".join(f"(?:{p})" for p in parts) + ")"


def lora_config(config: FinetuneConfig, model: torch.nn.Module):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules(config, model),
        modules_to_save=config.lora_modules_to_save,
        fan_in_fan_out=config.lora_fan_in_fan_out,
        use_dora=config.peft_use_dora,
        use_rslora=config.peft_use_rslora,
        bias="none",
    )


def attach_adapter(model: torch.nn.Module, config: FinetuneConfig, log=print):
    """Wrap the model with a new adapter, or continue from `lora_model_dir`."""
    from peft import PeftModel, get_peft_model

    if config.lora_model_dir:
        try:
            peft_model = PeftModel.from_pretrained(model, config.lora_model_dir, is_trainable=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise AdapterError(
                f"lora_model_dir: cannot load an adapter from {config.lora_model_dir}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
    else:
        try:
            peft_model = get_peft_model(model, lora_config(config, model))
        except ValueError as exc:
            raise AdapterError(
                f"lora_target_modules: {str(exc).splitlines()[0]} (modules in this model: "
                f"{', '.join(linear_module_names(model))})"
            ) from None
    trainable, total = peft_model.get_nb_trainable_parameters()
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return peft_model
