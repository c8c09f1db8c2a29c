"""What we know about the Hugging Face Hub without asking it: offline mode, the local cache,
and whether a name can be a Hub id at all."""

from __future__ import annotations

import os
import re
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
