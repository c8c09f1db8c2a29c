"""Tokenizer and base-model loading."""

from __future__ import annotations

from pathlib import Path

from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError


class ModelLoadError(FinetuneError):
    """The base model or its tokenizer cannot be loaded."""


def model_source(name: str) -> tuple[str, dict]:
    """`from_pretrained` arguments for a hub id, a local folder, or a local `.gguf` file."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"base_model: {name}: no such .gguf file")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        return str(path), {}
    return name, {}


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
