"""Reading the base checkpoint without loading it: its config, the name, dtype, shape and shard
of every tensor, tensors one at a time, and the architecture's layout from a meta-device model."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.dtypes import SAFETENSORS_DTYPES, short_dtype_name
from finetune.errors import MergeError


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class ModelLayout:
    """Facts about the architecture read from a weightless (meta-device) instance of it."""

    params: list[str]  # every parameter name, tied ones included
    tied: dict[str, str]  # tied parameter -> the parameter whose storage it shares
    input_embedding: str | None
    output_embedding: str | None
    quantized_4bit: set[str]  # weights transformers turns into bitsandbytes Linear4bit
    conv1d: set[str]  # weights stored (in, out), quantized after a transpose


def read_base_config(base_dir: Path) -> dict:
    config = read_json(base_dir / "config.json")
    if config.get("quantization_config"):
        raise MergeError(
            f"{base_dir / 'config.json'}: the base checkpoint is already quantized; merge into "
            "the full-precision model it was made from (nf4_roundtrip reproduces QLoRA's view)"
        )
    return config


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path}: not valid JSON ({exc})") from None


def resolve_base(base: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint folder, or the files of a Hub model downloaded into the HF cache."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(base).startswith((".", "/", "~")):
        raise MergeError(f"{base}: merge needs a folder with config.json and model weights")
    from huggingface_hub import snapshot_download

    common = ["*.json", "*.jinja", "*.model", "*.txt", "tokenizer*"]
    try:
        folder = Path(
            snapshot_download(
                str(base), revision=revision, allow_patterns=[*common, "*.safetensors"]
            )
        )
        if not any(folder.glob("*.safetensors")):  # an older repo: pickled weights only
            folder = Path(snapshot_download(str(base), revision=revision, allow_patterns="*.bin"))
    except Exception as exc:
        raise MergeError(
            f"{base}: not a local folder, and the Hub download failed ({exc})"
        ) from exc
    return folder


def read_checkpoint_index(folder: Path) -> dict[str, TensorInfo]:
    """Name, dtype, shape and shard of every tensor, in shard order, without reading data."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index_name).is_file():
            weight_map = read_json(folder / index_name)["weight_map"]
            shards = [folder / name for name in dict.fromkeys(weight_map.values())]
            break
        if (folder / single).is_file():
            shards = [folder / single]
            break
    else:
        raise MergeError(f"{folder}: no model.safetensors or pytorch_model.bin (or their index)")
    tensors = {}
    for shard in shards:
        if not shard.is_file():
            raise MergeError(f"{shard}: listed in the checkpoint index but missing")
        tensors.update(shard_tensor_infos(shard))
    return tensors


def shard_tensor_infos(shard: Path) -> dict[str, TensorInfo]:
    if shard.suffix == ".bin":
        state = load_pickled_shard(shard)
        return {k: TensorInfo(shard, v.dtype, tuple(v.shape)) for k, v in state.items()}
    with safe_open(shard, framework="pt") as f:
        infos = {}
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            piece = f.get_slice(name)
            infos[name] = TensorInfo(
                shard, SAFETENSORS_DTYPES[piece.get_dtype()], tuple(piece.get_shape())
            )
        return infos


def load_pickled_shard(shard: Path) -> dict[str, torch.Tensor]:
    # weights_only: a pickle can run arbitrary code; this refuses anything but tensors.
    try:
        return torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zip) pickles cannot be memory-mapped
        return torch.load(shard, map_location="cpu", weights_only=True)


def shard_reader(shard: Path) -> Callable[[str], torch.Tensor]:
    if shard.suffix == ".bin":
        state = load_pickled_shard(shard)
        # clone: tied tensors of a .bin share storage, which save_file refuses
        return lambda name: state[name].clone()

    def read(name: str) -> torch.Tensor:
        # A handle per tensor: closing it unmaps the shard, so the pages of tensors already
        # merged do not stay resident (otherwise peak RSS = input shard + output shard).
        with safe_open(shard, framework="pt") as f:
            return f.get_tensor(name)

    return read


def resolve_dtype(dtype: str | None, config: dict, checkpoint: dict[str, TensorInfo]) -> str:
    """bf16/fp16/fp32 from the argument, else config.json, else the first float tensor."""
    name = dtype or config.get("dtype") or config.get("torch_dtype")
    if name in (None, "auto"):
        floats = [info.dtype for info in checkpoint.values() if info.dtype.is_floating_point]
        name = str(floats[0]).removeprefix("torch.") if floats else "float32"
    short = short_dtype_name(str(name))
    if short is None:
        raise MergeError(f"dtype {name!r} is not one of bf16, fp16, fp32")
    return short


def read_model_layout(base_dir: Path, trust_remote_code: bool = False) -> ModelLayout:
    """Tied weights, embeddings and 4-bit-quantized layers, from a weightless model instance."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    # The rule transformers 5.x applies when it loads a model in 4-bit (lm_head, tied and
    # last modules stay in full precision).
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        with torch.device("meta"):
            config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        raise MergeError(
            f"{base_dir / 'config.json'}: transformers cannot build it ({exc})"
        ) from exc
    keep = get_keys_to_not_convert(model) + list(
        getattr(model, "_keep_in_fp32_modules", None) or []
    )
    quantized, conv1d = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            conv1d.add(name + ".weight")
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and (
            should_convert_module(name, keep)
        ):
            quantized.add(name + ".weight")

    def weight_of(module: torch.nn.Module | None) -> str | None:
        found = [n for n, m in model.named_modules() if module is not None and m is module]
        return found[0] + ".weight" if found else None

    return ModelLayout(
        params=[name for name, _ in model.named_parameters(remove_duplicate=False)],
        tied=dict(model.all_tied_weights_keys),
        input_embedding=weight_of(model.get_input_embeddings()),
        output_embedding=weight_of(model.get_output_embeddings()),
        quantized_4bit=quantized,
        conv1d=conv1d,
    )


def checkpoint_names(checkpoint: dict[str, TensorInfo], layout: ModelLayout) -> dict[str, str]:
    """Model parameter name -> name in the output checkpoint, for every name we can place.

    Checkpoints saved from the bare base model (older GPT-2 files) lack the head's prefix, so a
    name is also found with its first component removed. Tied parameters the checkpoint omits
    map to themselves: they are written only when the adapter unties them.
    """
    names = {name: name for name in checkpoint}
    for name in layout.params:
        short = name.split(".", 1)[-1]
        if name not in checkpoint and short in checkpoint:
            names[name] = short
    for tied in layout.tied:
        names.setdefault(tied, tied)
    return names
