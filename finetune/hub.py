"""What we know about the Hugging Face Hub without asking it: offline mode, the local cache,
and whether a name can be a Hub id at all."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

# `name` or `owner/name`: what the Hub accepts as a model or dataset id.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE forbids the Hugging Face Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    """True when the Hub repo's config.json is already in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # an id the hub client rejects is certainly not cached
        return False


def resolved_dataset_revision(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub dataset's `revision` (default: main) stands for: asked of the Hub when
    online, else read from the local cache; None when neither knows."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if not hub_offline():
        from huggingface_hub import HfApi

        try:
            return HfApi().dataset_info(repo_id, revision=revision).sha
        except Exception:  # unreachable, unknown or private: fall back to the cache
            pass
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = (
        Path(HF_HUB_CACHE)
        / f"datasets--{repo_id.replace('/', '--')}"
        / "refs"
        / (revision or "main")
    )
    return ref.read_text().strip() if ref.is_file() else None


# bitsandbytes (>= 0.50), imported by every `import peft`, asks the Hub for a compiled kernel
# (kernels-community/quantization-bitsandbytes, through the `kernels` package) at import time on
# CPUs with AVX512-BF16: a request to huggingface.co on every command, and code from the Hub run
# without trust_remote_code once the publisher is trusted. finetune never loads Hub kernels:
# while bitsandbytes imports, `kernels` cannot be imported, and bitsandbytes keeps its own kernels.
_BNB_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
_ABSENT = object()  # `kernels` was not imported before bitsandbytes


class _BitsandbytesWithoutHubKernels:
    """A meta path finder: the first import of bitsandbytes runs with `kernels` unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        import importlib.machinery

        sys.meta_path.remove(self)  # once: later imports find the loaded module
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_without_hub_kernels(module):
            kernels = sys.modules.get("kernels", _ABSENT)
            sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
            try:
                exec_module(module)
            finally:
                if kernels is _ABSENT:
                    sys.modules.pop("kernels", None)
                else:
                    sys.modules["kernels"] = kernels

        spec.loader.exec_module = exec_without_hub_kernels
        return spec


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_HUB_KERNEL_WARNING)


def no_hub_kernels_in_bitsandbytes() -> None:
    """Install the guard (the package root does, before anything imports bitsandbytes)."""
    if "bitsandbytes" in sys.modules or any(
        isinstance(finder, _BitsandbytesWithoutHubKernels) for finder in sys.meta_path
    ):
        return
    sys.meta_path.insert(0, _BitsandbytesWithoutHubKernels())
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelWarning())
