"""A `.gguf` base_model: dequantized once into a cached plain checkpoint, which train, merge and
inference all use. Tiny GGUF files of three architectures are written here with the `gguf`
package's own writer (random weights, some Q8_0, SmolLM2's tokenizer cut to 1,024 tokens)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, dequantize, quantize
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from finetune.config import FinetuneConfig
from finetune.model.default_model import default_model_gguf
from finetune.model.gguf import ensure_gguf_checkpoint, gguf_checkpoint_path
from finetune.model.source import base_model_warnings, resolve_base_model

ARCHITECTURES = ["llama", "qwen2", "gemma3"]
SAMPLES = Path(__file__).parents[2] / "data" / "samples"
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 128, 2, 4, 2, 16, 1024


def _tokenizer_fields(vocab: int) -> dict:
    """SmolLM2's GGUF tokenizer, cut to its first `vocab` tokens and the merges among them."""
    reader = GGUFReader(default_model_gguf())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    merges = [
        merge
        for merge in reader.fields["tokenizer.ggml.merges"].contents()
        if set(merge.split(" ")) <= kept and merge.replace(" ", "") in kept
    ]
    fields = {
        "tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.merges": (merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
    }
    types = reader.fields["tokenizer.ggml.token_type"].contents()[:vocab]
    fields["tokenizer.ggml.token_type"] = (types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") and key not in fields:
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            fields[key] = (field.contents(), field.types[0], sub_type)
    return fields


def write_tiny_gguf(path: Path, architecture: str, tokenizer: dict, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    if architecture == "gemma3":
        writer.add_key_length(HEAD_DIM)
        writer.add_value_length(HEAD_DIM)
        writer.add_sliding_window(8)
    for key, (value, value_type, sub_type) in tokenizer.items():
        writer.add_key_value(key, value, value_type, sub_type=sub_type)

    def tensor(name: str, *shape: int, quantized: bool = False) -> None:
        data = (rng.standard_normal(shape) * 0.25).astype(np.float32)
        if quantized:
            q8 = GGMLQuantizationType.Q8_0
            writer.add_tensor(name, quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, data)

    def ones(name: str, size: int) -> None:
        writer.add_tensor(name, np.ones(size, np.float32))

    tensor("token_embd.weight", VOCAB, HIDDEN, quantized=True)
    for layer in range(LAYERS):
        block = f"blk.{layer}."
        ones(block + "attn_norm.weight", HIDDEN)
        ones(block + "ffn_norm.weight", HIDDEN)
        tensor(block + "attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        tensor(block + "attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        tensor(block + "attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        tensor(block + "attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        if architecture == "qwen2":
            tensor(block + "attn_q.bias", HEADS * HEAD_DIM)
            tensor(block + "attn_k.bias", KV_HEADS * HEAD_DIM)
            tensor(block + "attn_v.bias", KV_HEADS * HEAD_DIM)
        if architecture == "gemma3":
            ones(block + "attn_q_norm.weight", HEAD_DIM)
            ones(block + "attn_k_norm.weight", HEAD_DIM)
            ones(block + "post_attention_norm.weight", HIDDEN)
            ones(block + "post_ffw_norm.weight", HIDDEN)
        tensor(block + "ffn_gate.weight", FFN, HIDDEN)
        tensor(block + "ffn_up.weight", FFN, HIDDEN)
        tensor(block + "ffn_down.weight", HIDDEN, FFN, quantized=True)
    ones("output_norm.weight", HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    tokenizer = _tokenizer_fields(VOCAB)
    files = {}
    for architecture in ARCHITECTURES:
        files[architecture] = folder / f"tiny-{architecture}.gguf"
        write_tiny_gguf(files[architecture], architecture, tokenizer)
    return files


@pytest.fixture
def cache(tmp_path_factory, monkeypatch) -> Path:
    """One FINETUNE_CACHE for this module's tests, so each file converts once."""
    folder = tmp_path_factory.getbasetemp() / "gguf-cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(folder))
    return folder


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_converted_checkpoint_is_plain_and_computes_what_the_gguf_does(
    cache, gguf_files, architecture
):
    gguf_file = gguf_files[architecture]
    folder = ensure_gguf_checkpoint(gguf_file, log=lambda message: None)
    assert folder.parent == cache / "models" / "gguf"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    # The weights: the gguf package's own dequantization of the file (unpermuted tensors).
    weights = load_file(folder / "model.safetensors")
    tensors = {tensor.name: tensor for tensor in GGUFReader(gguf_file).tensors}
    for gguf_name, name in [
        ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),  # Q8_0
        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),  # F32
    ]:
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
        assert torch.equal(weights[name], expected), name

    # The whole model: transformers' own reading of the GGUF gives the same logits.
    ids = torch.tensor([[1, 56, 478, 95, 905, 28, 216, 376, 259, 198, 103, 962]])
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    original = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits)


def test_converts_once_and_again_only_when_the_file_changes(cache, gguf_files, tmp_path):
    gguf_file = tmp_path / "copy.gguf"
    gguf_file.write_bytes(gguf_files["llama"].read_bytes())
    config = FinetuneConfig(
        base_model=str(gguf_file), datasets=[{"path": "unused.jsonl", "type": "alpaca"}]
    )
    assert "dequantized into a plain checkpoint" in base_model_warnings(config)[0]
    said: list[str] = []
    folder = ensure_gguf_checkpoint(gguf_file, log=said.append)
    assert said and base_model_warnings(config) == []
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns
    said.clear()
    assert ensure_gguf_checkpoint(gguf_file, log=said.append) == folder
    assert said == [] and (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert resolve_base_model(str(gguf_file)) == str(folder)

    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_checkpoint_path(gguf_file) != folder  # an edited file is converted afresh


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gguf_base_model_trains_merges_and_answers(cache, gguf_files, tmp_path, architecture):
    from finetune.inference import generate_reply, load_for_inference
    from finetune.merge import merge_adapter
    from finetune.train import train

    gguf_file = gguf_files[architecture]
    config = FinetuneConfig(
        base_model=str(gguf_file),
        datasets=[{"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"}],
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        sample_packing=True,
        sequence_len=256,
        micro_batch_size=1,
        max_steps=2,
        learning_rate=1e-3,
        bf16=False,
        save_steps=1000,
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    result = train(config, log=lambda message: None)
    assert result.global_step == 2
    converted = gguf_checkpoint_path(gguf_file)
    adapter = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(converted)

    # As `finetune merge` and `finetune inference` resolve base_model: the same folder.
    base = resolve_base_model(config.base_model)
    assert base == str(converted)
    merged = result.output_dir / "merged"
    merge_adapter(base, result.output_dir, merged, log=lambda message: None)

    messages = [{"role": "user", "content": "Hello"}]
    prompt = torch.tensor([[1, 56, 478, 95, 905, 28, 216]])
    answers, logits = [], []
    for model, tokenizer in (
        load_for_inference(base, result.output_dir),
        load_for_inference(merged),
    ):
        answers.append(generate_reply(model, tokenizer, messages, max_new_tokens=4))
        with torch.no_grad():
            logits.append(model(prompt).logits)
    assert all(isinstance(answer, str) for answer in answers)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
