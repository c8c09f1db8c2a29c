"""On CUDA with flash-attn installed: `attn_implementation: flash_attention_2` on a packed row
(the batch `finetune train` builds: positions restarting per sample, sample boundaries given,
no attention mask) computes the loss and LoRA gradients of the same samples run one by one.

Run with `make test-gpu`; without CUDA (or without flash-attn, or on a GPU older than Ampere)
every test here is reported as skipped.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from finetune.data.packing import collate_packed
from finetune.train.loss import kept_token_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("flash_attn") is None,
        reason="flash-attn is not installed (pip install flash-attn --no-build-isolation)",
    ),
]

VOCAB = 1031
# The same kernel on the same tokens; what differs is the shape of every matmul around it,
# which bf16 rounds differently (one-by-one vs one row). A leak across samples moves the loss
# and gradients by far more (asserted below, so the check can fail).
LOSS_TOLERANCE = 5e-3
GRAD_TOLERANCE = 3e-2


@pytest.fixture(autouse=True)
def ampere_or_later():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("flash-attention 2 needs an Ampere or later GPU")


def lora_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.25,  # peaked attention, so that what is attended to matters
    )
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="flash_attention_2", dtype=torch.bfloat16
    ).cuda()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.train()


def samples() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for length, prompt in [(700, 100), (300, 60), (1100, 200), (96, 16)]:
        ids = rng.integers(0, VOCAB, length).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def on_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_and_grads(model, batches: list[dict], total: int):
    model.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for batch in batches:
        loss, _, _ = kept_token_loss(model, batch, num_items_in_batch=total)
        loss.backward()
        loss_sum += loss.item()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss_sum, grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_packed_row_equals_samples_one_by_one():
    rows = samples()
    total = sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)
    model = lora_model()
    packed = on_cuda(collate_packed(rows, 0))
    expected, expected_grads = loss_and_grads(
        model, [on_cuda(collate_packed([row], 0)) for row in rows], total
    )
    loss, grads = loss_and_grads(model, [packed], total)

    assert abs(loss - expected) / expected <= LOSS_TOLERANCE
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative(grad, expected_grads[name]) <= GRAD_TOLERANCE, name

    # The same row as one long sequence (positions running on, no boundaries): samples attend
    # to each other, and the comparison above would have caught it.
    leaking = {
        "input_ids": packed["input_ids"],
        "labels": packed["labels"],
        "position_ids": torch.arange(packed["input_ids"].shape[1], device="cuda")[None],
    }
    leaked, leaked_grads = loss_and_grads(model, [leaking], total)
    worst = max(relative(leaked_grads[n], expected_grads[n]) for n in expected_grads)
    assert abs(leaked - expected) / expected > 4 * LOSS_TOLERANCE or worst > 4 * GRAD_TOLERANCE
