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
def save_tiny_model(smollm2_tokenizer):
    """save_tiny_model(folder, family="llama", **config): a random 2-layer model of the family
    (hidden 64, GQA 4:2, seed 0) with SmolLM2's tokenizer, saved as a normal checkpoint folder;
    keywords change its config. Families: llama, qwen2 (biases on q/k/v)."""
    import torch
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }

    def save(folder, family="llama", **overrides):
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
        config_class, model_class = (getattr(transformers, name) for name in classes[family])
        model_class(config_class(**{**values, **overrides})).save_pretrained(folder)
        smollm2_tokenizer.save_pretrained(folder)
        return folder

    return save


@pytest.fixture(scope="session")
def save_tiny_llama(save_tiny_model):
    """save_tiny_llama(folder, **config): save_tiny_model's Llama."""
    return lambda folder, **overrides: save_tiny_model(folder, "llama", **overrides)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, save_tiny_llama):
    """A 2-layer Llama with SmolLM2's tokenizer, saved as a normal checkpoint folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, save_tiny_model):
    """A second family: a 2-layer Qwen2 (q/k/v biases, untied head) with SmolLM2's tokenizer."""
    return save_tiny_model(
        tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie_word_embeddings=False
    )


def pytest_terminal_summary(terminalreporter):
    """Say how large the bad-input corpus is (tests/test_bad_inputs.py runs every case)."""
    from pathlib import Path

    cases = list((Path(__file__).parent / "bad_inputs").glob("*.yaml"))
    terminalreporter.write_line(f"bad-input corpus: {len(cases)} cases")
