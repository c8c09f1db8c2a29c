"""A `.gguf` base model as a plain checkpoint, dequantized once into the finetune cache.

transformers reads GGUF files (dequantizing every tensor to float32), but the model it returns
carries a GGUF quantization flag that the Trainer refuses, and merging reads safetensors. So a
`.gguf` base_model is converted once into `$FINETUNE_CACHE/models/gguf/NAME-KEY/` (the key
hashes the file's absolute path, size and modification time, so an edited file converts again)
and train, merge and inference all use that folder. The embedded default model
(default_model.py) is converted by the same code.

Folders are staged (finetune/fs.py) and renamed into place only when complete: if the target
folder exists, it is a finished conversion.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from finetune.errors import FinetuneError, ModelLoadError
from finetune.fs import remove_stale_staging, staged_folder

# A temporary folder this old belongs to a conversion that was killed.
STALE_TEMP_SECONDS = 3600
# Files whose presence makes a folder a converted checkpoint (weights: one file or an index).
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def finetune_cache_dir() -> Path:
    """`$FINETUNE_CACHE` when set, else `~/.cache/finetune`."""
    configured = os.environ.get("FINETUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "finetune"


def gguf_checkpoint_path(gguf_file: Path) -> Path:
    """Where the converted checkpoint of `gguf_file` lives (converted or not)."""
    gguf_file = Path(gguf_file).expanduser().resolve()
    stat = gguf_file.stat()
    identity = f"{gguf_file}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()
    key = hashlib.sha256(identity).hexdigest()[:16]
    return finetune_cache_dir() / "models" / "gguf" / f"{gguf_file.stem}-{key}"


def ensure_gguf_checkpoint(gguf_file: Path, log: Callable[[str], object] = print) -> Path:
    """The checkpoint folder of `gguf_file`, converting it on first use.

    Safe to run from several processes at once: each converts into its own temporary folder
    and the first to finish renames it into place; the others keep that one.
    """
    gguf_file = Path(gguf_file).expanduser()
    target = gguf_checkpoint_path(gguf_file)
    if target.exists():
        check_complete(target, f"delete that folder and run again to convert {gguf_file} afresh")
        return target
    remove_stale_staging(target, STALE_TEMP_SECONDS)
    log(f"Converting {gguf_file} into a plain checkpoint in {target} (once)")
    started = time.monotonic()
    with staged_folder(target, replace=False) as staging:
        write_gguf_checkpoint(gguf_file, staging)
    check_complete(target, f"delete that folder and run again to convert {gguf_file} afresh")
    log(f"Converted {gguf_file.name} in {time.monotonic() - started:.0f} s")
    return target


def write_gguf_checkpoint(
    gguf_file: Path, folder: Path, adjust: Callable[[object, object], None] | None = None
) -> None:
    """Dequantize `gguf_file` and save it into `folder` as a float32 safetensors checkpoint
    with its tokenizer. `adjust(model, tokenizer)` may fix either before they are saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, name = str(Path(gguf_file).parent), Path(gguf_file).name
    try:
        config = AutoConfig.from_pretrained(source, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=name, config=config, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(
            f"base_model: transformers cannot read {gguf_file}: {str(exc).splitlines()[0]}; "
            "give a GGUF of an architecture transformers supports, or a model folder"
        ) from None

    # The GGUF-loaded model carries a `quantization_config` (and a quantizer) although its weights
    # are already dequantized to float32; saved as is, config.json would claim a GGUF quantization
    # the safetensors do not have. A fresh model from a clean config holds the same tensors.
    clean_config = copy.deepcopy(gguf_model.config)
    for attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(clean_config, attribute):
            delattr(clean_config, attribute)
    model = AutoModelForCausalLM.from_config(clean_config, dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model

    # The GGUF has no length limit, so transformers records a huge one: use the model's context.
    tokenizer.model_max_length = clean_config.get_text_config().max_position_embeddings
    if adjust is not None:
        adjust(model, tokenizer)
    _check_tied_embeddings(model, gguf_file)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _check_tied_embeddings(model, gguf_file: Path) -> None:
    """A model that ties lm_head to embed_tokens must come out tied: an untied copy would train
    two diverging matrices."""
    if not model.config.get_text_config().tie_word_embeddings:
        return
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise FinetuneError(
            f"converting {gguf_file}: lm_head is not tied to embed_tokens although the config "
            "says tie_word_embeddings; please report this with your transformers version"
        )


def check_complete(folder: Path, remedy: str) -> None:
    """Fail when `folder` lacks a file every converted checkpoint has."""
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise FinetuneError(
            f"{folder} exists but is not a complete model (missing {', '.join(missing)}); {remedy}"
        )
