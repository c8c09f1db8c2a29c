"""ZeRO-3 loading reads the checkpoint a tensor at a time: the reader must return exactly what
safetensors itself reads, and only checkpoints that match the model name for name may take that
path (the rest go through transformers' loader, which renames and converts). The loading itself
is checked end to end by tests/train/test_distributed.py (two ZeRO-3 processes on a sharded
checkpoint train the one-process adapter)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.model.zero3_load import (
    read_tensor,
    stored_tensors,
    why_not_partitioned,
)


def test_the_reader_returns_what_safetensors_reads(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5),
        "b.weight": torch.randn(3, 4).to(torch.bfloat16),
        "c.half": torch.randn(9).to(torch.float16),
        "d.ids": torch.arange(11, dtype=torch.int64),
        "e.empty": torch.zeros(0, 3),
        "f.scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    expected = load_file(tmp_path / "model.safetensors")
    stored = stored_tensors(tmp_path)
    assert sorted(t.name for t in stored) == sorted(expected)
    for tensor in stored:
        value = read_tensor(tensor)
        assert value.dtype == expected[tensor.name].dtype
        assert torch.equal(value, expected[tensor.name]), tensor.name


def test_a_sharded_checkpoint_is_listed_shard_by_shard(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="4KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    stored = stored_tensors(tmp_path)
    assert len({t.shard for t in stored}) > 1
    state = model.state_dict()
    for tensor in stored:
        assert torch.equal(read_tensor(tensor), state[tensor.name]), tensor.name
    assert why_not_partitioned(model, stored, torch.float32) is None


def test_no_safetensors_means_transformers_loads_it(tmp_path):
    assert stored_tensors(tmp_path) is None


def test_renamed_missing_or_reshaped_tensors_go_to_transformers(tmp_path):
    model = tiny_llama()
    # lm_head.weight is the embedding (tied): a checkpoint stores it once
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    cases = {
        "renamed": {
            ("transformer." + k if k.startswith("model.") else k): v for k, v in state.items()
        },
        "missing": {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k},
        "reshaped": {**state, "model.norm.weight": torch.ones(3)},
    }
    reasons = {}
    for case, values in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        save_file(values, folder / "model.safetensors", metadata={"format": "pt"})
        reasons[case] = why_not_partitioned(model, stored_tensors(folder), torch.float32)
    assert "is not a parameter of the model" in reasons["renamed"]
    assert reasons["missing"] == "the checkpoint has no 'model.layers.1.mlp.up_proj.weight'"
    assert reasons["reshaped"] == "'model.norm.weight' is [3] in the checkpoint, [16] here"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)
