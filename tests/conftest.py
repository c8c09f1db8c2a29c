"""Shared fixtures: the real SmolLM2 tokenizer from the embedded model (converted once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from finetune.embedded import ensure_embedded_model

    return ensure_embedded_model(log=lambda message: None)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
