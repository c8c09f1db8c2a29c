"""Reading a peft LoRA / rsLoRA / DoRA adapter folder into per-weight updates, and refusing
adapters a plain weight merge cannot reproduce."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.errors import MergeError
from finetune.merge.checkpoint import read_json

PEFT_PREFIX = "base_model.model."

# peft options whose forward pass a plain weight merge cannot reproduce.
UNMERGEABLE_OPTIONS = {
    "layer_replication": "it duplicates layers at load time",
    "alora_invocation_tokens": "an activated LoRA only acts after its invocation tokens",
    "trainable_token_indices": "trainable tokens are not supported by merge yet",
    "target_parameters": "LoRA on bare parameters is not supported by merge yet",
    "use_qalora": "QALoRA merges into quantization groups, not plain weights",
}

# Initialisations that rewrite the base weights at training time: the saved adapter only merges
# into that rewritten base unless peft converted it when saving.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoraUpdate:
    """One adapted weight: W' = W + scale * B @ A, or its DoRA form when `magnitude` is set."""

    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    scale: float
    fan_in_fan_out: bool  # the base stores this weight as (in, out)
    magnitude: torch.Tensor | None = None  # DoRA: target norm of each output row


@dataclass
class Adapter:
    """The adapter's tensors keyed by the parameter they change (peft prefixes stripped)."""

    folder: Path
    weights_file: Path
    config: dict
    updates: dict[str, LoraUpdate] = field(default_factory=dict)
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # lora_bias, scaled
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)  # resized base weights
    saved_modules: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save

    def names(self) -> set[str]:
        return (
            set(self.updates)
            | set(self.bias_deltas)
            | set(self.base_layers)
            | set(self.saved_modules)
        )


def read_adapter(folder: Path) -> Adapter:
    """Read adapter_config.json and the adapter weights of a peft LoRA/DoRA adapter folder."""
    if not folder.is_dir():
        raise MergeError(f"{folder}: adapter folder not found; train first or pass its path")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise MergeError(
            f"{config_file}: not found; point to the folder `finetune train` saved the adapter in"
        )
    config = read_json(config_file)
    refuse_unmergeable_config(config, config_file)
    weights_file = folder / "adapter_model.safetensors"
    if weights_file.is_file():
        with safe_open(weights_file, framework="pt") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    elif (folder / "adapter_model.bin").is_file():
        weights_file = folder / "adapter_model.bin"
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    else:
        raise MergeError(
            f"{folder}: has no adapter_model.safetensors (or .bin); the adapter was not saved"
        )
    adapter = Adapter(folder, weights_file, config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    copies: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, part in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_B.bias", "bias"),
            (".lora_embedding_A", "embedding_A"),
            (".lora_embedding_B", "embedding_B"),
            (".lora_magnitude_vector.weight", "magnitude"),
            (".lora_magnitude_vector", "magnitude"),
        ):
            if name.endswith(suffix):
                parts.setdefault(name.removesuffix(suffix), {})[part] = tensor
                break
        else:
            # A whole tensor replaces the base's, as peft's loading does: the trained copy of a
            # saved module, `X.weight`. With resized or adapted embeddings peft also saves whole
            # layers: `X.base_layer.weight` / `X.original_module.weight` (the resized base
            # weight) and `X.modules_to_save.weight` (the trained copy, again).
            param = re.sub(r"\.(base_layer|original_module|modules_to_save)\.", ".", name)
            if ".lora_" in name:
                raise MergeError(f"{weights_file}: tensor {key!r} is of a kind merge cannot fold")
            if ".modules_to_save." in name:
                copies[param] = tensor
            elif param != name:
                adapter.base_layers[param] = tensor
            else:
                adapter.saved_modules[param] = tensor
    for param, tensor in copies.items():
        adapter.saved_modules.setdefault(param, tensor)
    for module, module_parts in parts.items():
        lora_update(module, module_parts, config, weights_file, adapter)
    return adapter


def refuse_unmergeable_config(config: dict, config_file: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(
            f"{config_file}: peft_type {config['peft_type']} is not LoRA; cannot merge"
        )
    for option, why in UNMERGEABLE_OPTIONS.items():
        if config.get(option):
            raise MergeError(f"{config_file}: {option} is set; cannot merge because {why}")
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(BASE_REWRITING_INITS):
        raise MergeError(
            f"{config_file}: init_lora_weights={init} rewrote the base weights during training; "
            "save the adapter with peft's path_initial_model_for_weight_conversion first"
        )


def lora_update(
    module: str, parts: dict[str, torch.Tensor], config: dict, weights_file: Path, adapter: Adapter
) -> None:
    """Turn one module's lora_A/lora_B(/magnitude/bias) tensors into a LoraUpdate."""
    embedding = "embedding_A" in parts or "embedding_B" in parts
    lora_A = parts.get("embedding_A" if embedding else "A")
    lora_B = parts.get("embedding_B" if embedding else "B")
    if lora_A is None or lora_B is None:
        raise MergeError(f"{weights_file}: {module} has only one of lora_A/lora_B; file is damaged")
    if lora_A.ndim != 2:
        raise MergeError(f"{weights_file}: {module} is a convolution LoRA; merge supports linear")
    rank = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    if lora_A.shape[0] != rank or lora_B.shape[1] != rank:
        raise MergeError(
            f"{weights_file}: {module} has rank {lora_A.shape[0]}/{lora_B.shape[1]} (lora_A/lora_B)"
            f" but adapter_config.json says r={rank}; the config does not belong to these weights"
        )
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    magnitude = parts.get("magnitude")
    adapter.updates[module + ".weight"] = LoraUpdate(
        lora_A=lora_A.float(),
        lora_B=lora_B.float(),
        scale=scale,
        # peft's embedding LoRA is stored transposed: delta = (B @ A).T, like fan_in_fan_out
        fan_in_fan_out=embedding or bool(config.get("fan_in_fan_out")),
        magnitude=None if magnitude is None else magnitude.float(),
    )
    if "bias" in parts:
        adapter.bias_deltas[module + ".bias"] = parts["bias"].float() * scale


def pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """peft's rank_pattern/alpha_pattern lookup: the first key matching the module path's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def align_adapter(adapter: Adapter, names: dict[str, str]) -> Adapter:
    """Re-key the adapter by output tensor name, refusing names or shapes the base lacks."""

    def place(name: str) -> str:
        if name not in names:
            raise MergeError(
                f"{adapter.weights_file}: adapts {name!r}, which the base checkpoint does not "
                "have; is this adapter for a different base model?"
            )
        return names[name]

    aligned = Adapter(adapter.folder, adapter.weights_file, adapter.config)
    aligned.updates = {place(k): v for k, v in adapter.updates.items()}
    aligned.bias_deltas = {place(k): v for k, v in adapter.bias_deltas.items()}
    aligned.base_layers = {place(k): v for k, v in adapter.base_layers.items()}
    aligned.saved_modules = {place(k): v for k, v in adapter.saved_modules.items()}
    return aligned
