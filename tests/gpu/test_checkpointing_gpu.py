"""On CUDA: `gradient_checkpointing: true` and `offload` train the same as no checkpointing, on a
packed row through per-sample attention, and each keeps less GPU memory for backward.

Run with `make test-gpu`; without CUDA every test here is reported as skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from finetune.config import FinetuneConfig
from finetune.data.packing import collate_packed
from finetune.model.load import enable_gradient_checkpointing
from finetune.train.attention import register_attention
from finetune.train.loss import kept_token_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB = 1031


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def lora_model(checkpointing):
    """Built in `finetune train`'s order: base model, checkpointing, then the adapter."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        initializer_range=0.25,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register_attention())
    model = model.cuda()
    run = FinetuneConfig(
        base_model="unused",
        datasets=[{"path": "unused.jsonl", "type": "alpaca"}],
        gradient_checkpointing=checkpointing,
    )
    enable_gradient_checkpointing(model, run)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.train()


def packed_row() -> dict:
    rng = np.random.default_rng(0)
    samples = []
    for length, prompt in [(1500, 300), (900, 200), (1696, 400)]:  # 4,096 tokens
        ids = rng.integers(0, VOCAB, length).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate_packed(samples, 0).items()}


def step(model, batch):
    """Loss, adapter gradients, and GPU bytes held between forward and backward."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss, _, _ = kept_token_loss(model, batch)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, held


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_checkpointing_and_offload_train_the_same_in_less_gpu_memory():
    batch = packed_row()
    expected, expected_grads, held_plain = step(lora_model(False), batch)
    results = {kind: step(lora_model(kind), batch) for kind in (True, "offload")}

    for kind, (loss, grads, _) in results.items():
        assert abs(loss - expected) / expected <= 1e-5, kind
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert relative(grad, expected_grads[name]) <= 1e-5, (kind, name)
    held_checkpointed, held_offloaded = results[True][2], results["offload"][2]
    assert held_checkpointed < held_plain / 3
    # the layers' inputs (4 x 4,096 x 256 fp32 = 16 MiB) wait in pinned CPU memory instead
    assert held_offloaded < held_checkpointed - 8 * 2**20
