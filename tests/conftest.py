"""Shared fixtures: the real SmolLM2 tokenizer from the embedded model (converted once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from finetune.model.default_model import ensure_default_model

    return ensure_default_model(log=lambda message: None)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def save_tiny_llama(smollm2_tokenizer):
    """save_tiny_llama(folder, **config): a random 2-layer Llama (hidden 64, GQA 4:2, seed 0)
    with SmolLM2's tokenizer, saved as a normal checkpoint folder; keywords change its config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def save(folder, **overrides):
        torch.manual_seed(0)
        values = {
            "vocab_size": len(smollm2_tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "bos_token_id": smollm2_tokenizer.bos_token_id,
            "eos_token_id": smollm2_tokenizer.eos_token_id,
            "pad_token_id": smollm2_tokenizer.pad_token_id,
            "tie_word_embeddings": True,
        }
        LlamaForCausalLM(LlamaConfig(**{**values, **overrides})).save_pretrained(folder)
        smollm2_tokenizer.save_pretrained(folder)
        return folder

    return save


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, save_tiny_llama):
    """A 2-layer Llama with SmolLM2's tokenizer, saved as a normal checkpoint folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def pytest_terminal_summary(terminalreporter):
    """Say how large the bad-input corpus is (tests/test_bad_inputs.py runs every case)."""
    from pathlib import Path

    cases = list((Path(__file__).parent / "bad_inputs").glob("*.yaml"))
    terminalreporter.write_line(f"bad-input corpus: {len(cases)} cases")
