"""Fold a trained LoRA / rsLoRA / DoRA adapter into its base model, one checkpoint shard at a time.

The merge never builds the model. It reads the base checkpoint tensor by tensor, adds the
adapter's update to the weights it targets (in fp32), and writes each output shard as soon as it
is complete, so memory holds one output shard (at most one input shard, or `max_shard_size`)
plus the adapter, whatever the model's size. Everything is written into a hidden folder next to
the target and renamed into place only when complete, so an interrupted merge leaves nothing
that looks like a finished model (a killed one leaves a hidden `.NAME.tmp-PID` folder, safe to
delete).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.errors import FinetuneError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
}
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
PEFT_PREFIX = "base_model.model."
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
# Allowed max |logit difference| between base+adapter and the merged model, relative to
# max(1, largest |reference logit|). An fp32 merge differs only by summation order; bf16 and
# fp16 round each merged weight once more than the unmerged forward does.
VERIFY_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}
# Against a 4-bit reference, bitsandbytes' CPU/GPU kernels add their own rounding on top.
NF4_VERIFY_TOLERANCE = 5e-2
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


class MergeError(FinetuneError):
    """The adapter cannot be merged into this base, or the merged model is not trustworthy."""


@dataclass
class MergeReport:
    """What a merge did; `max_abs_logit_diff` and `greedy_agreement` are None when not verified."""

    output_dir: Path
    dtype: str
    tensors_merged: int
    tensors_replaced: int
    tensors_nf4_roundtripped: int
    tensors_written: int
    shards: int
    total_size: int
    seconds: float = 0.0
    max_abs_logit_diff: float | None = None
    greedy_agreement: float | None = None


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


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


@dataclass
class ModelLayout:
    """Facts about the architecture read from a weightless (meta-device) instance of it."""

    params: list[str]  # every parameter name, tied ones included
    tied: dict[str, str]  # tied parameter -> the parameter whose storage it shares
    input_embedding: str | None
    output_embedding: str | None
    quantized_4bit: set[str]  # weights transformers turns into bitsandbytes Linear4bit
    conv1d: set[str]  # weights stored (in, out), quantized after a transpose


@dataclass(frozen=True)
class OutputTensor:
    name: str
    source: str  # checkpoint tensor it starts from
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class MergePlan:
    shards: list[tuple[Path, list[OutputTensor]]]  # (input shard, tensors) per output shard
    config_changes: dict  # for config.json: dtype, vocab_size, tie_word_embeddings

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for _, tensors in self.shards for t in tensors)


@dataclass(frozen=True)
class Nf4Settings:
    """How training quantized the base: which weights, and the dtype it computed in."""

    weights: frozenset[str]  # output names of the weights bitsandbytes quantized
    conv1d: frozenset[str]
    compute_dtype: torch.dtype
    double_quant: bool

    @classmethod
    def for_layout(
        cls, layout: ModelLayout, names: dict, compute_dtype: torch.dtype, double_quant: bool
    ) -> Nf4Settings:
        return cls(
            weights=frozenset(names[n] for n in layout.quantized_4bit if n in names),
            conv1d=frozenset(names[n] for n in layout.conv1d if n in names),
            compute_dtype=compute_dtype,
            double_quant=double_quant,
        )


def merge_adapter(
    base: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    nf4_roundtrip: bool = False,
    nf4_compute_dtype: str | None = None,
    nf4_double_quant: bool = True,
    verify: bool | None = None,
    revision: str | None = None,
    log: Callable[[str], object] = print,
) -> MergeReport:
    """Write `base` with the adapter in `adapter_dir` folded in to `output_dir`.

    `base` is a local folder (safetensors or pickled `.bin` shards, the latter read with
    `weights_only=True`) or a Hugging Face Hub id. The result is safetensors shards plus an
    index, `config.json` (output dtype, no `quantization_config`), `generation_config.json` and
    the tokenizer (the adapter folder's when it has one, else the base's). It loads with
    `AutoModelForCausalLM.from_pretrained` without peft.

    `dtype` (bf16, fp16, fp32) defaults to the base checkpoint's. Input shards are never joined,
    and are split at `max_shard_size` ("5GB", "500MB", or bytes): peak memory is about one
    output shard plus the adapter. A non-empty `output_dir` is refused unless `force`, and even
    then is replaced only once the new model is complete (and verified).

    QLoRA: by default the adapter is merged into the original full-precision base. The adapter
    was trained against the nf4-rounded weights, though, so this model differs a little from
    the one training saw (while keeping the base's full precision). `nf4_roundtrip=True` first
    passes every weight bitsandbytes quantized during training (the transformer blocks' linear
    layers; not embeddings, lm_head or norms) through nf4 and back, in `nf4_compute_dtype`
    (default: the output dtype) with `nf4_double_quant` as in training, so the merged model
    computes what training saw at the price of the nf4 rounding error. The output is never
    re-quantized.

    `verify` loads base+adapter with peft and the merged model, and compares logits and greedy
    continuations of a few token-id prompts; None verifies when both fit comfortably in RAM.
    Raises MergeError, leaving any existing `output_dir` untouched, when anything is wrong.
    """
    started = time.perf_counter()
    target = Path(output_dir)
    refuse_occupied_target(target, force)
    adapter = read_adapter(Path(adapter_dir))
    base_dir = resolve_base(base, revision)
    refuse_target_over_inputs(target, [base_dir, adapter.folder])
    config = read_base_config(base_dir)
    checkpoint = read_checkpoint_index(base_dir)
    out_dtype = resolve_dtype(dtype, config, checkpoint)
    layout = read_model_layout(base_dir)
    names = checkpoint_names(checkpoint, layout)
    adapter = align_adapter(adapter, names)
    plan = plan_output(checkpoint, adapter, layout, names, DTYPES[out_dtype], max_shard_size)
    nf4 = None
    if nf4_roundtrip:
        compute_dtype = resolve_dtype(nf4_compute_dtype or out_dtype, config, checkpoint)
        nf4 = Nf4Settings.for_layout(layout, names, DTYPES[compute_dtype], nf4_double_quant)
    report = MergeReport(
        output_dir=target,
        dtype=out_dtype,
        tensors_merged=len(adapter.updates),
        tensors_replaced=len(adapter.saved_modules),
        tensors_nf4_roundtripped=len(nf4.weights) if nf4 else 0,
        tensors_written=sum(len(tensors) for _, tensors in plan.shards),
        shards=len(plan.shards),
        total_size=plan.total_size,
    )
    log(
        f"merging {adapter.weights_file} into {base_dir}: {report.tensors_merged} adapted weights,"
        f" {report.tensors_replaced} saved modules, {out_dtype}, {report.shards} shards"
    )

    with staged_output(target, force) as staging:
        for index, (shard, tensors) in enumerate(plan.shards):
            name = shard_file_name(index, len(plan.shards))
            merged = merge_lora_shard(shard, tensors, adapter, nf4)
            save_file(merged, staging / name, metadata={"format": "pt"})
            log(f"wrote {name} ({len(merged)} tensors)")
            del merged  # free this shard before reading the next
        write_shard_index(plan, staging)
        write_model_config(config, plan.config_changes, staging)
        match_file_modes(staging)
        write_generation_config(base_dir, staging)
        copy_tokenizer(adapter.folder, base_dir, staging)
        if verify or (verify is None and fits_in_memory_twice(plan)):
            check_merged_model(base_dir, adapter.folder, staging, nf4, report, log)
    report.seconds = time.perf_counter() - started
    log(f"merged model written to {target} in {report.seconds:.1f} s")
    return report


# ---------------------------------------------------------------------------- reading inputs


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
    short = DTYPE_ALIASES.get(str(name), str(name))
    if short not in DTYPES:
        raise MergeError(f"dtype {name!r} is not one of bf16, fp16, fp32")
    return short


def read_model_layout(base_dir: Path) -> ModelLayout:
    """Tied weights, embeddings and 4-bit-quantized layers, from a weightless model instance."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    # The rule transformers 5.x applies when it loads a model in 4-bit (lm_head, tied and
    # last modules stay in full precision).
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
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


# -------------------------------------------------------------------------------- planning


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


def plan_output(
    checkpoint: dict[str, TensorInfo],
    adapter: Adapter,
    layout: ModelLayout,
    names: dict[str, str],
    out_dtype: torch.dtype,
    max_shard_size: str | int,
) -> MergePlan:
    """Every output tensor with its source and final shape, grouped into output shards."""
    limit = parse_size(max_shard_size)
    touched = adapter.names()
    sources = {name: name for name in checkpoint}
    config_changes: dict = {}
    for tied, partner in layout.tied.items():
        tied_name, partner_name = names[tied], names.get(partner, partner)
        # A tied weight the adapter changes (or whose partner it changes) must be written out on
        # its own: peft computed them separately, so the merged model cannot share them.
        if {tied_name, partner_name} & touched:
            sources.setdefault(tied_name, partner_name)
            config_changes["tie_word_embeddings"] = False

    shapes = {}
    for name, source in sources.items():
        shapes[name] = output_shape(name, checkpoint[source].shape, adapter, layout, names)
    check_vocab(shapes, layout, names, config_changes, adapter)
    config_changes["dtype"] = str(out_dtype).removeprefix("torch.")
    config_changes["torch_dtype"] = config_changes["dtype"]  # only where the base has this key

    by_shard: dict[Path, list[OutputTensor]] = {}
    for name, source in sources.items():
        info = checkpoint[source]
        dtype = out_dtype if info.dtype.is_floating_point else info.dtype
        by_shard.setdefault(info.shard, []).append(OutputTensor(name, source, dtype, shapes[name]))
    shards = []
    for shard, tensors in by_shard.items():  # output shards never span two input shards
        group: list[OutputTensor] = []
        size = 0
        for tensor in tensors:
            if group and size + tensor.nbytes > limit:
                shards.append((shard, group))
                group, size = [], 0
            group.append(tensor)
            size += tensor.nbytes
        shards.append((shard, group))
    return MergePlan(shards, config_changes)


def output_shape(
    name: str, base_shape: tuple, adapter: Adapter, layout: ModelLayout, names: dict
) -> tuple[int, ...]:
    """The merged tensor's shape; refuses adapter tensors whose shapes do not fit the base."""
    where = adapter.weights_file
    embeddings = {names.get(layout.input_embedding), names.get(layout.output_embedding)}
    for replacement in (adapter.base_layers.get(name), adapter.saved_modules.get(name)):
        if replacement is None:
            continue
        same_width = tuple(replacement.shape[1:]) == tuple(base_shape[1:])
        if tuple(replacement.shape) != tuple(base_shape) and not (
            name in embeddings and same_width
        ):
            raise MergeError(
                f"{where}: {name} has shape {tuple(replacement.shape)}, the base "
                f"{tuple(base_shape)}; is this adapter for a different base model?"
            )
        base_shape = tuple(replacement.shape)
    update = adapter.updates.get(name)
    if update is not None:
        delta_shape = (update.lora_B.shape[0], update.lora_A.shape[1])
        if update.fan_in_fan_out:
            delta_shape = delta_shape[::-1]
        if tuple(delta_shape) != tuple(base_shape):
            raise MergeError(
                f"{where}: the update of {name} has shape {tuple(delta_shape)}, the base weight "
                f"{tuple(base_shape)}; is this adapter for a different base model?"
            )
        out_features = delta_shape[1] if update.fan_in_fan_out else delta_shape[0]
        if update.magnitude is not None and update.magnitude.numel() != out_features:
            raise MergeError(f"{where}: the DoRA magnitude of {name} does not fit the weight")
    return tuple(base_shape)


def check_vocab(
    shapes: dict, layout: ModelLayout, names: dict, config_changes: dict, adapter: Adapter
) -> None:
    """Record the merged vocabulary size; input and output embeddings must agree on it."""
    rows = {
        role: shapes[names[weight]][0]
        for role, weight in (("input", layout.input_embedding), ("output", layout.output_embedding))
        if weight in names and names[weight] in shapes
    }
    if len(set(rows.values())) > 1:
        raise MergeError(
            f"{adapter.weights_file}: the input embedding has {rows['input']} rows but the output "
            f"embedding {rows['output']}; when adding tokens, put both embed_tokens and lm_head "
            "in lora_modules_to_save"
        )
    if rows:
        config_changes["vocab_size"] = next(iter(rows.values()))


def parse_size(size: str | int) -> int:
    """ "5GB" -> 5_000_000_000, "2GiB" -> 2**31 (the Hugging Face convention)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise MergeError(f"max_shard_size {size!r}: write a size like 5GB, 500MB or 2GiB")
    unit = (match.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    return int(float(match.group(1)) * (1024 if "I" in unit else 1000) ** power)


# --------------------------------------------------------------------------------- merging


def merge_lora_shard(
    shard: Path,
    tensors: list[OutputTensor],
    adapter: Adapter,
    nf4: Nf4Settings | None = None,
) -> dict[str, torch.Tensor]:
    """The output tensors of one shard, each read from the base and merged in fp32."""
    read = shard_reader(shard)
    merged = {}
    for out in tensors:
        if out.name in adapter.saved_modules:
            tensor = adapter.saved_modules[out.name]
        else:
            tensor = adapter.base_layers.get(out.name)
            if tensor is None:
                tensor = adapter.base_layers.get(out.source)
            if tensor is None:
                tensor = read(out.source)
            if nf4 and out.source in nf4.weights:
                tensor = nf4_roundtrip(tensor, nf4, conv1d=out.source in nf4.conv1d)
            if out.name in adapter.updates:
                tensor = merge_lora_weight(tensor, adapter.updates[out.name])
            if out.name in adapter.bias_deltas:
                tensor = tensor.float() + adapter.bias_deltas[out.name]
        merged[out.name] = tensor.to(out.dtype).contiguous()
    return merged


def merge_lora_weight(weight: torch.Tensor, update: LoraUpdate) -> torch.Tensor:
    """W + scale * B @ A in fp32, or DoRA's m * (W + sBA) / ||W + sBA|| per output row."""
    weight = weight.float()
    if update.fan_in_fan_out:  # weight is (in, out): add (B @ A).T = A.T @ B.T
        merged = torch.addmm(weight, update.lora_A.T, update.lora_B.T, alpha=update.scale)
    else:
        merged = torch.addmm(weight, update.lora_B, update.lora_A, alpha=update.scale)
    if update.magnitude is None:
        return merged
    # peft (DoraLinearLayer.get_weight_norm) takes the L2 norm of each output row of the
    # (out, in) weight; with fan_in_fan_out those rows are our columns.
    row_dim = 0 if update.fan_in_fan_out else 1
    norm = torch.linalg.norm(merged, dim=row_dim, keepdim=True)
    magnitude = update.magnitude.view_as(norm)
    return merged * (magnitude / norm)


def nf4_roundtrip(weight: torch.Tensor, nf4: Nf4Settings, conv1d: bool) -> torch.Tensor:
    """The weight a QLoRA layer computed with: nf4 in blocks of 64, dequantized, compute dtype."""
    import bitsandbytes.functional as bnb

    # transformers quantizes Conv1D weights as (out, in), like nn.Linear's
    oriented = weight.T.contiguous() if conv1d else weight.contiguous()
    packed, state = bnb.quantize_4bit(
        oriented, blocksize=64, compress_statistics=nf4.double_quant, quant_type="nf4"
    )
    restored = bnb.dequantize_4bit(packed, state).to(nf4.compute_dtype).float()
    return restored.T if conv1d else restored


# --------------------------------------------------------------------------------- writing


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


@contextmanager
def staged_output(target: Path, force: bool) -> Iterator[Path]:
    """A hidden folder next to `target` that replaces it only when the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        staging.rename(target)
        return
    # Move the old folder aside first: a crash between the two renames leaves no target
    # (and the old model in `.NAME.old-PID`), never a half-written one under the target's name.
    previous = target.parent / f".{target.name}.old-{os.getpid()}"
    target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous)


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


def write_generation_config(base_dir: Path, folder: Path) -> None:
    source = base_dir / "generation_config.json"
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


# ---------------------------------------------------------------------------- verification


def fits_in_memory_twice(plan: MergePlan) -> bool:
    """Whether base+adapter and the merged model, both in fp32, fit in half the free memory."""
    import psutil

    fp32_bytes = sum(math.prod(t.shape) * 4 for _, tensors in plan.shards for t in tensors)
    return 2 * fp32_bytes < 0.5 * psutil.virtual_memory().available


def check_merged_model(
    base_dir: Path,
    adapter_folder: Path,
    merged_dir: Path,
    nf4: Nf4Settings | None,
    report: MergeReport,
    log: Callable[[str], object],
) -> None:
    """Compare the merged model with peft's base+adapter on a few prompts; fill in `report`.

    With nf4, the reference is the adapter on a 4-bit load of the base, as in training.
    """
    from peft import PeftModel  # only here: a merged model must not need peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = None
    if nf4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=nf4.double_quant,
            bnb_4bit_compute_dtype=nf4.compute_dtype,
        )
    reference = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, quantization_config=quantization
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    vocab_size = merged.get_input_embeddings().num_embeddings
    if reference.get_input_embeddings().num_embeddings != vocab_size:  # tokens were added
        reference.resize_token_embeddings(vocab_size, mean_resizing=False)
    reference = PeftModel.from_pretrained(reference, adapter_folder).eval()

    # Token ids work for every model, with or without a tokenizer.
    prompts = torch.randint(0, vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(prompts).logits
        diff = (merged(prompts).logits - expected).abs().max().item()
        same = greedy_tokens(reference, prompts) == greedy_tokens(merged, prompts)
    report.max_abs_logit_diff = diff
    report.greedy_agreement = same.all(dim=1).float().mean().item()
    tolerance = NF4_VERIFY_TOLERANCE if nf4 else VERIFY_TOLERANCE[report.dtype]
    allowed = tolerance * max(1.0, expected.abs().max().item())
    log(
        f"verified: max |logit difference| {diff:.3g} (allowed {allowed:.3g}), greedy "
        f"continuations agree on {report.greedy_agreement:.0%} of {len(prompts)} prompts"
    )
    if not diff <= allowed:  # `not <=` also catches NaN
        raise MergeError(
            f"the merged model's logits differ from base + adapter by {diff:.3g}, more than the "
            f"{allowed:.3g} allowed for {report.dtype}; {report.output_dir} was left unchanged"
        )


def greedy_tokens(model: torch.nn.Module, prompts: torch.Tensor, steps: int = 8) -> torch.Tensor:
    ids = prompts
    for _ in range(steps):
        next_ids = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, prompts.shape[1] :]
