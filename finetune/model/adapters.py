"""PEFT adapters from the config: LoRA, QLoRA, DoRA, rsLoRA."""

from __future__ import annotations

import re

import torch

from finetune.config import FinetuneConfig
from finetune.errors import AdapterError
from finetune.machine import shards_parameters


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of every linear layer except the output head, and except
    transformers' Linear subclasses with a forward of their own (Llama 4's router returns a
    tuple, which a LoRA layer around it cannot add to)."""
    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__
        if (
            is_linear
            and module is not output
            and "lm_head" not in name
            and not _reshapes_linear_output(module)
        ):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _reshapes_linear_output(module: torch.nn.Module) -> bool:
    cls = type(module)
    return (
        isinstance(module, torch.nn.Linear)
        and cls.__module__.startswith("transformers.")
        and cls.forward is not torch.nn.Linear.forward
    )


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
    import warnings

    from peft import PeftModel, get_peft_model

    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning about
    # library code that a user can do nothing about, printed into every run's output.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
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
    if not config.uses_fsdp():  # FSDP wants one dtype per wrapped unit
        keep_trained_weights_in_fp32(peft_model)
    no_input_round_trip_under_autocast(peft_model)
    if not shards_parameters(config):  # ZeRO-3 / FSDP gather B's weight in its module call
        from finetune.model.fused_lora import fuse_lora_updates

        fuse_lora_updates(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return peft_model


def keep_trained_weights_in_fp32(model: torch.nn.Module) -> list[str]:
    """Upcast every trained weight that is not float32 (LoRA's already are): the
    `lora_modules_to_save` copies of embed_tokens / lm_head that new tokens need.

    Whatever the compute dtype, their master weights stay float32, as Axolotl upcasts them:
    in bf16 a step smaller than 1/256 of a weight rounds away. Mixed precision computes with
    them in bf16 under autocast. Returns the names upcast.
    """
    upcast = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()  # in place: ties to the same Parameter survive
            upcast.append(name)
    return upcast


def no_input_round_trip_under_autocast(model: torch.nn.Module) -> None:
    """Under autocast, let LoRA's A matrix take its input in the autocast dtype instead of
    peft's upcast to the adapter's float32 and autocast's cast straight back.

    The round trip is exact (bf16/fp16 -> fp32 -> the same dtype), so loss and gradients are
    bit-identical, but it costs memory and copies: float32 temporaries of every adapted layer's
    input and of its gradient, and bf16 copies kept for the backward pass beside the ones the
    base layers keep (three per decoder layer with `lora_target_linear`). SmolLM2-135M, 4 x 1024
    packed tokens in bf16: the first two steps peak at 4.8 GB instead of 5.7 GB and the first
    takes 12-13 s instead of 15-17 s (mostly page faults). Only where the input already has
    autocast's dtype (a float32 input, or any input outside autocast, meets float32 weights as
    before); peft's quantized layers skip the cast under autocast themselves. Not for DoRA
    layers: DoRA computes with the float32 input outside autocast's casts (the loss moves in
    its 4th digit).
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    def round_trip_needed(module, args):
        x = args[0] if args else None
        module.cast_input_dtype_enabled = not (
            isinstance(x, torch.Tensor)
            and torch.is_autocast_enabled(x.device.type)
            and x.dtype == torch.get_autocast_dtype(x.device.type)
        )

    for module in model.modules():
        if isinstance(module, LoraLinear) and not module.lora_variant:  # variant: DoRA
            module.register_forward_pre_hook(round_trip_needed)
