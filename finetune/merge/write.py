"""Writing the merged model: refusing unsafe targets, shard names and index, config.json,
generation_config.json and the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune.errors import MergeError
from finetune.merge.plan import MergePlan

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def refuse_occupied_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise MergeError(f"{target}: exists and is not a folder; choose another output folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise MergeError(
            f"{target}: folder is not empty; pass --force to replace it, or choose another folder"
        )


def refuse_target_over_inputs(target: Path, inputs: list[Path]) -> None:
    """Replacing the target must never delete the base or the adapter being merged."""
    resolved = target.resolve()
    for folder in inputs:
        if resolved == folder.resolve() or resolved in folder.resolve().parents:
            raise MergeError(f"{target}: would replace the input {folder}; choose another folder")


def shard_file_name(index: int, count: int) -> str:
    if count == 1:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard_index(plan: MergePlan, folder: Path) -> None:
    count = len(plan.shards)
    if count == 1:
        return
    weight_map = {
        tensor.name: shard_file_name(index, count)
        for index, (_, tensors) in enumerate(plan.shards)
        for tensor in tensors
    }
    index = {
        "metadata": {"total_size": plan.total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_model_config(config: dict, changes: dict, folder: Path) -> None:
    """The base's config.json with the output dtype, vocabulary and tying; never quantized."""
    config = {key: value for key, value in config.items() if key != "quantization_config"}
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for key, value in changes.items():
        if key == "torch_dtype" and key not in config:
            continue  # written only where the base used the pre-5.0 name
        if key in text_config:  # multimodal configs keep vocab and tying in text_config
            text_config[key] = value
        if key in config or not text_config or key == "dtype":
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def match_file_modes(folder: Path) -> None:
    # safetensors creates its files 0600; give the shards the umask's mode, like config.json.
    mode = (folder / "config.json").stat().st_mode
    for shard in folder.glob("*.safetensors"):
        shard.chmod(mode)


def write_generation_config(adapter_folder: Path, base_dir: Path, folder: Path) -> None:
    """The run's generation_config.json (training adds its end-of-turn token to the stop
    tokens), else the base's, else one derived from config.json."""
    for source in (adapter_folder / "generation_config.json", base_dir / "generation_config.json"):
        if source.is_file():
            shutil.copy2(source, folder / source.name)
            return
    from transformers import AutoConfig, GenerationConfig

    model_config = AutoConfig.from_pretrained(folder)
    GenerationConfig.from_model_config(model_config).save_pretrained(folder)


def copy_tokenizer(adapter_folder: Path, base_dir: Path, folder: Path) -> None:
    """The adapter's tokenizer (training may have added tokens) when it has one, else the base's."""

    def has_tokenizer(where: Path) -> bool:
        return any((where / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json"))

    source = adapter_folder if has_tokenizer(adapter_folder) else base_dir
    for name in TOKENIZER_FILES:
        chat_template = adapter_folder / name
        if name.startswith("chat_template") and chat_template.is_file():
            shutil.copy2(chat_template, folder / name)
        elif (source / name).is_file():
            shutil.copy2(source / name, folder / name)
