"""Architecture details transformers' GGUF reader does not read back, checked against
transformers' own implementation; and families export refuses by name."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from export_runs import SAMPLES, small_tokenizer, template_text
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from finetune.config import FinetuneConfig
from finetune.errors import ExportError
from finetune.export import export_model

LLAMA_3_1_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def run_of_checkpoint(model_config, tmp_path: Path) -> tuple[FinetuneConfig, Path]:
    """A run folder whose merged model is a freshly saved checkpoint of `model_config`."""
    tokenizer = small_tokenizer("bytelevel")
    model_config.vocab_size = len(tokenizer)
    AutoModelForCausalLM.from_config(model_config).save_pretrained(tmp_path / "run" / "merged")
    tokenizer.chat_template = template_text("chatml")
    tokenizer.save_pretrained(tmp_path / "run")
    config = FinetuneConfig(
        base_model=str(tmp_path / "run" / "merged"),
        datasets=[{"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"}],
        output_dir=str(tmp_path / "run"),
    )
    return config, tmp_path / "run"


def test_llama_3_1_rope_scaling_travels_as_rope_freqs(tmp_path):
    """llama.cpp applies Llama 3.1's rope scaling from a `rope_freqs` tensor of per-frequency
    divisors: they must turn the plain rope frequencies into transformers' llama3 ones."""
    model_config = LlamaConfig(
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_parameters=LLAMA_3_1_ROPE,
    )
    config, run = run_of_checkpoint(model_config, tmp_path)
    path = export_model(config, run, log=lambda _: None).gguf_file

    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    head_dim = 256 // 4
    plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model_config, "cpu")
    divisors = torch.from_numpy(stored["rope_freqs.weight"])
    assert torch.allclose(plain / divisors, scaled, rtol=1e-6)


def test_an_unsupported_family_is_refused_by_name(tmp_path):
    config, run = run_of_checkpoint(
        GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=64), tmp_path
    )
    with pytest.raises(ExportError, match="model type 'gpt2' cannot be exported to GGUF yet"):
        export_model(config, run, log=lambda _: None)
    assert not (run / "export").exists() or not any((run / "export").iterdir())
