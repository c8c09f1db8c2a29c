"""The tokenizer and the base model for training: dtype, quantization, attention backend."""

from __future__ import annotations

from finetune.config import FinetuneConfig
from finetune.errors import ModelLoadError
from finetune.machine import check_combinations_for_machine
from finetune.model.source import model_source


def load_tokenizer(config: FinetuneConfig):
    """The run's tokenizer: special tokens and added tokens applied, a pad token guaranteed."""
    from transformers import AutoTokenizer

    source = model_source(config.tokenizer_config or config.base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=config.revision_of_model,
            trust_remote_code=config.trust_remote_code,
            use_fast=True,  # offsets for label masking; tokenizer_use_fast: false is warned of
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"tokenizer: cannot load from {source}: {str(exc).splitlines()[0]}"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"tokenizer: {source} has no fast tokenizer; finetune needs one (tokenizer.json)"
        )
    known = set(tokenizer.get_vocab())
    if config.special_tokens:
        tokenizer.add_special_tokens(dict(config.special_tokens))
    if config.tokens:
        tokenizer.add_tokens(list(config.tokens))
    # A new pad token needs no training (pad positions are never attended to nor trained); any
    # other new token appears in the data, and its embedding must learn what it means.
    added = set(tokenizer.get_vocab()) - known - {tokenizer.pad_token}
    if added and config.adapter is not None:
        _require_trainable_embeddings(config, len(added))
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


def compute_dtype_name(config: FinetuneConfig) -> str:
    """bf16/fp16 when training in them, else fp32 (`bf16: auto` resolved by finetune.machine)."""
    if config.bf16 is True:
        return "bf16"
    return "fp16" if config.fp16 else "fp32"


def torch_dtype(config: FinetuneConfig):
    """The dtype weights are loaded in: bf16/fp16 when training in them, else fp32."""
    from finetune.dtypes import FLOAT_DTYPES

    return FLOAT_DTYPES[compute_dtype_name(config)]


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


def text_config(model_config):
    """The language model's part of a model config (a multimodal config's text config, else
    the config itself): where the layers, hidden size and vocabulary are."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else None
    return text or model_config


def load_model_config(config: FinetuneConfig):
    """The base model's own config (`base_model_config` when set), without its weights."""
    from transformers import AutoConfig

    source = model_source(config.base_model_config or config.base_model)
    try:
        return AutoConfig.from_pretrained(
            source,
            revision=None if config.base_model_config else config.revision_of_model,
            trust_remote_code=config.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"base_model: cannot read the config of {config.base_model}: {str(exc).splitlines()[0]}"
        ) from None


def load_model(
    config: FinetuneConfig, tokenizer, attn_implementation: str | None = None, log=print
):
    """The base model for training: dtype, quantization, attention backend, embeddings resized
    to the tokenizer, k-bit preparation and gradient checkpointing applied. Under ZeRO-3 it is
    created partitioned and filled a few tensors at a time (finetune.model.zero3_load)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    check_combinations_for_machine(config)
    source, extra = model_source(config.base_model), {}
    quantization = quantization_config(config)
    if quantization is not None and torch.cuda.is_available():
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if config.base_model_config:
        from transformers import AutoConfig

        extra["config"] = AutoConfig.from_pretrained(
            config.base_model_config, trust_remote_code=config.trust_remote_code
        )
    model = None
    if quantization is None and _zero3_enabled():
        model = _load_partitioned(config, source, attn_implementation, log)
    try:
        model = model or AutoModelForCausalLM.from_pretrained(
            source,
            revision=config.revision_of_model,
            trust_remote_code=config.trust_remote_code,
            dtype=torch_dtype(config),
            quantization_config=quantization,
            attn_implementation=attn_implementation or config.attn_implementation,
            use_safetensors=True,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"base_model: cannot load {config.base_model}: {str(exc).splitlines()[0]}"
        ) from None
    embedding = model.get_input_embeddings().weight
    rows = getattr(embedding, "ds_shape", embedding.shape)[0]  # ZeRO-3: the whole, not the shard
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        from finetune.dtypes import keep_4bit_layers_in_compute_dtype

        # Checkpointing is ours to set up (below), the same way for every adapter kind.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layers_in_compute_dtype(model)
    enable_gradient_checkpointing(model, config)
    return model


def _zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _load_partitioned(config: FinetuneConfig, source: str, attn_implementation, log):
    """ZeRO-3 without rank 0 reading the whole checkpoint; None where transformers must load it
    (a checkpoint it renames or converts, remote code, no local safetensors)."""
    from pathlib import Path

    from finetune.model.zero3_load import load_partitioned

    if config.trust_remote_code:
        log("ZeRO-3: remote model code; transformers loads the checkpoint (rank 0 reads all of it)")
        return None
    folder = Path(source)
    if not folder.is_dir():
        folder = _hub_snapshot(config, source)
        if folder is None:
            return None
    model_config = load_model_config(config)
    return load_partitioned(
        folder,
        model_config,
        torch_dtype(config),
        attn_implementation or config.attn_implementation,
        log,
    )


def _hub_snapshot(config: FinetuneConfig, repo_id: str):
    """The Hub model's safetensors and json files (downloaded as from_pretrained would)."""
    from pathlib import Path

    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=config.revision_of_model,
                allow_patterns=["*.safetensors", "*.json"],
            )
        )
    except Exception:  # noqa: BLE001 (from_pretrained then reports the problem in its words)
        return None


def enable_gradient_checkpointing(model, config: FinetuneConfig) -> None:
    """`gradient_checkpointing: true`: each decoder layer keeps only its input and recomputes
    the rest in backward. `offload`: those inputs wait for the backward in pinned CPU memory.

    Non-reentrant by default (torch's recommended kind: it works with inputs that do not require
    grad, keyword arguments such as the packed batch's `cu_seq_lens_*`, and nested autograd);
    Axolotl's default is `use_reentrant: true`. `gradient_checkpointing_kwargs` overrides it.
    """
    if not config.gradient_checkpointing:
        return
    if config.fsdp_setting("activation_checkpointing"):
        return  # FSDP2 checkpoints each layer it wraps; a second checkpoint would recompute twice
    kwargs = {"use_reentrant": False, **(config.gradient_checkpointing_kwargs or {})}
    # Also makes the embeddings' output require grad, which reentrant checkpointing needs for
    # gradients to reach the adapters of a frozen model.
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=kwargs,
        offload=config.gradient_checkpointing == "offload",
    )
