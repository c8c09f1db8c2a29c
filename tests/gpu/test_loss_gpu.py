"""On CUDA: the loss kernels (our chunked one, Liger's and cut-cross-entropy's fused ones when
installed) equal cross-entropy over the full logits, in loss and gradients.

Run with `make test-gpu`; without CUDA every test here is reported as skipped.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from finetune.data.packing import collate_packed
from finetune.train.linear_cross_entropy import fused_kernel, linear_cross_entropy
from finetune.train.loss import kept_token_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB = 1031  # prime: no other dimension has this size
TOLERANCE = 1e-5  # fp32
KERNEL_PACKAGES = {
    "chunked": None,
    "liger": "liger_kernel",
    "cut-cross-entropy": "cut_cross_entropy",
}


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would round the reference's (and torch's per-chunk) matmuls to 10-bit mantissas."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def installed(kernel: str) -> bool:
    package = KERNEL_PACKAGES[kernel]
    return package is None or importlib.util.find_spec(package) is not None


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("head", ["plain", "softcap", "scale"])
@pytest.mark.parametrize("kernel", list(KERNEL_PACKAGES))
def test_kernel_equals_full_logits_cross_entropy(kernel, head):
    if not installed(kernel):
        pytest.skip(f"{KERNEL_PACKAGES[kernel]} is not installed (pip install -e '.[gpu]')")
    scale, softcap = {"plain": (1.0, None), "softcap": (1.0, 3.0), "scale": (0.0625, None)}[head]
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(1000, 128, device="cuda", generator=generator) * 2).requires_grad_()
    weight = torch.randn(VOCAB, 128, device="cuda", generator=generator).requires_grad_()
    targets = torch.randint(0, VOCAB, (1000,), device="cuda", generator=generator)

    logits = F.linear(hidden, weight) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    expected = F.cross_entropy(logits, targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    loss = linear_cross_entropy(
        hidden, weight, targets, scale=scale, softcap=softcap, chunk_tokens=300, kernel=kernel
    )
    grads = torch.autograd.grad(loss, (hidden, weight))

    assert abs(loss.item() - expected.item()) / expected.item() <= TOLERANCE
    assert relative(grads[0], expected_grads[0]) <= TOLERANCE
    assert relative(grads[1], expected_grads[1]) <= TOLERANCE


def packed_batch() -> dict:
    rng = np.random.default_rng(0)
    samples = []
    for length, prompt in [(230, 50), (170, 40), (310, 90), (120, 30)]:
        ids = rng.integers(0, VOCAB, length).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate_packed(samples, 0).items()}


@pytest.mark.parametrize("family", ["llama_tied", "llama_untied", "gemma2_softcapped"])
def test_lora_step_on_cuda_equals_full_logits(family):
    """`kept_token_loss` as training runs it: the fused kernel when installed, else ours."""
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "initializer_range": 0.25,
    }
    if family.startswith("llama"):
        config = LlamaConfig(**common, tie_word_embeddings=family == "llama_tied")
    else:
        config = Gemma2Config(
            **common, head_dim=32, query_pre_attn_scalar=32, final_logit_softcapping=2.0
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").cuda()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    batch = packed_batch()

    loss, outputs, _ = kept_token_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert outputs.logits.shape[1] == 0, f"the chunked path ({fused_kernel()}) did not run"

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    expected = (
        F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
        / (labels != -100).sum()
    )
    expected.backward()
    expected_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert abs(loss.item() - expected.item()) / expected.item() <= TOLERANCE
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative(grad, expected_grads[name]) <= TOLERANCE, name
