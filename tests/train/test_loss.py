"""The chunked loss equals cross-entropy over the full logits, in loss and gradients.

The reference is independent of the code under test: the model's own full-logits forward (no
`logits_to_keep`), shifted by hand, through `F.cross_entropy`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model

from finetune.data.packing import collate_packed
from finetune.train.linear_cross_entropy import chunk_tokens_for, linear_cross_entropy
from finetune.train.loss import kept_token_loss

VOCAB = 311  # prime: no other dimension of the tiny models has this size
TOLERANCE = 1e-5  # fp32


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------- the function alone


def reference_sum(hidden, weight, targets, bias=None, scale=1.0, softcap=None):
    logits = F.linear(hidden, weight, bias).float() * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


HEADS = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 3.0},  # well below the logits' range: the cap bends most of them
    "scale": {"scale": 0.0625, "bias": True},
}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("chunk", [1, 10, 7, 50, None])  # 50 tokens: 10 divides, 7 does not
def test_linear_cross_entropy_equals_full_logits(head, chunk):
    options = dict(HEADS[head])
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(50, 32, generator=generator) * 2).requires_grad_()
    weight = torch.randn(VOCAB, 32, generator=generator).requires_grad_()
    bias = (
        torch.randn(VOCAB, generator=generator).requires_grad_() if options.pop("bias", 0) else None
    )
    targets = torch.randint(0, VOCAB, (50,), generator=generator)
    leaves = [t for t in (hidden, weight, bias) if t is not None]

    expected = reference_sum(hidden, weight, targets, bias, **options)
    expected_grads = torch.autograd.grad(expected, leaves)
    loss = linear_cross_entropy(hidden, weight, targets, bias, chunk_tokens=chunk, **options)
    grads = torch.autograd.grad(loss, leaves)

    assert abs(loss.item() - expected.item()) / expected.item() <= TOLERANCE
    names = ("hidden", "weight", "bias")[: len(leaves)]
    for name, grad, reference in zip(names, grads, expected_grads, strict=True):
        assert relative(grad, reference) <= TOLERANCE, name


def test_chunk_size_keeps_fp32_logits_of_a_chunk_within_128_mib():
    assert chunk_tokens_for(49152) == 682  # SmolLM2
    assert chunk_tokens_for(128256) == 261  # Llama 3
    assert 682 * 49152 * 4 <= 128 * 2**20 < 683 * 49152 * 4


# ------------------------------------------------------------------------- in a model's forward

COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.25,  # peaked attention, large logits (the soft-cap bites)
}
FAMILIES = {
    "llama_untied": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "gemma2_softcapped": (  # final logits = tanh(x / 2) * 2
        "Gemma2Config",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 2.0},
    ),
    "cohere_logit_scale": ("CohereConfig", {"logit_scale": 0.25}),
    "granite_logits_scaling": ("GraniteConfig", {"logits_scaling": 4.0}),
}


def family_model(family: str, seed: int = 0) -> torch.nn.Module:
    class_name, options = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**COMMON, **options})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def with_lora(model, seed: int = 1, **options) -> torch.nn.Module:
    """LoRA on the attention and MLP projections, B made non-zero so every adapter matters."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=4, target_modules=options.pop("targets", targets), lora_dropout=0.0, **options
    )
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def packed_batch(seed: int = 0) -> dict:
    """Four samples in one packed row (positions restart, sample boundaries, no mask), prompts
    masked: 62 trained tokens."""
    rng = np.random.default_rng(seed)
    samples = []
    for length, prompt in [(23, 5), (17, 4), (31, 9), (12, 3)]:
        ids = rng.integers(0, VOCAB, length).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return collate_packed(samples, pad_token_id=0)


def reference_step(model, batch) -> tuple[float, dict]:
    """Full logits, shifted by hand, plain cross-entropy over the trained tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = (
        F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            reduction="sum",
        )
        / (targets != -100).sum()
    )
    loss.backward()
    return loss.item(), gradients(model)


def chunked_step(model, batch, chunk_tokens=None) -> tuple[float, dict, torch.Tensor]:
    loss, outputs, _ = kept_token_loss(model, batch, chunk_tokens=chunk_tokens)
    loss.backward()
    return loss.item(), gradients(model), outputs.logits


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same(ours: tuple[float, dict], reference: tuple[float, dict], tolerance=TOLERANCE):
    (loss, grads), (expected, expected_grads) = ours, reference
    assert abs(loss - expected) / expected <= tolerance
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative(grad, expected_grads[name]) <= tolerance, name


@pytest.mark.parametrize("family", list(FAMILIES))
# 62 trained tokens: one chunk; 2 chunks of 31; 8 chunks, the last one short
@pytest.mark.parametrize("chunk_tokens", [None, 31, 8])
def test_lora_step_on_a_packed_row_equals_full_logits(family, chunk_tokens):
    model = with_lora(family_model(family))
    batch = packed_batch()

    loss, grads, logits = chunked_step(model, batch, chunk_tokens)
    assert logits.shape[1] == 0  # the head computed no logits: the chunked path ran

    assert sum("lora_A" in name for name in grads) == 14
    assert_same((loss, grads), reference_step(model, batch))


@pytest.mark.parametrize("family", ["llama_untied", "gemma2_softcapped"])
def test_trained_head_in_modules_to_save_gets_the_reference_gradient(family):
    model = with_lora(family_model(family), modules_to_save=["lm_head"])
    batch = packed_batch()

    loss, grads, logits = chunked_step(model, batch, chunk_tokens=8)
    assert logits.shape[1] == 0
    assert any("modules_to_save" in name and "lm_head" in name for name in grads)
    assert_same((loss, grads), reference_step(model, batch))


def test_full_fine_tuning_of_a_tied_head_gets_both_uses_gradients():
    model = family_model("llama_tied")  # the embedding matrix is the head: grads from both uses
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = packed_batch()

    loss, grads, logits = chunked_step(model, batch, chunk_tokens=8)
    assert logits.shape[1] == 0
    assert "model.embed_tokens.weight" in grads
    assert_same((loss, grads), reference_step(model, batch))


def test_lora_on_the_head_falls_back_to_the_models_logits():
    targets = ["q_proj", "v_proj", "lm_head"]
    model = with_lora(family_model("llama_untied"), targets=targets)
    batch = packed_batch()

    loss, grads, logits = chunked_step(model, batch)
    assert logits.shape[1] == 62  # logits at the kept positions only, as before
    assert any("lm_head.lora_A" in name for name in grads)
    assert_same((loss, grads), reference_step(model, batch))


def test_padded_batch_of_two_rows_equals_full_logits():
    model = with_lora(family_model("llama_untied"))
    packed = packed_batch()
    ids, labels = packed["input_ids"][0], packed["labels"][0]
    pad = torch.zeros(17, dtype=torch.long)
    batch = {  # rows of different lengths, right-padded, different prompt masks
        "input_ids": torch.stack([ids[:40], torch.cat([ids[40:63], pad])]),
        "labels": torch.stack([labels[:40], torch.cat([labels[40:63], pad - 100])]),
        "attention_mask": torch.ones(2, 40, dtype=torch.long),
    }
    batch["attention_mask"][1, 23:] = 0

    loss, grads, logits = chunked_step(model, batch, chunk_tokens=8)
    assert logits.shape[1] == 0
    assert_same((loss, grads), reference_step(model, batch))


def test_bf16_model_stays_close_to_its_full_logits():
    model = with_lora(family_model("gemma2_softcapped")).to(torch.bfloat16)
    batch = packed_batch()
    # Same bf16 matmuls on both sides; the difference is fp32 vs bf16 soft-capping and the
    # order of the sums.
    assert_same(chunked_step(model, batch)[:2], reference_step(model, batch), tolerance=2e-2)


def test_backward_never_holds_vocabulary_wide_tensors():
    """What makes the loss fit long sequences: nothing (tokens x vocab) is kept for backward."""
    model = with_lora(family_model("llama_tied"))
    batch = packed_batch()

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_vocab_wide(path: str) -> list[tuple[int, ...]]:
        wide = []

        def pack(tensor):
            is_weight = tensor.untyped_storage().data_ptr() in weights  # (a view of) a parameter
            if tensor.dim() >= 2 and tensor.shape[-1] == VOCAB and not is_weight:
                wide.append(tuple(tensor.shape))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, _, _ = kept_token_loss(model, batch, path=path)
        loss.backward()
        return wide

    assert saved_vocab_wide("full_logits")  # the old path keeps its logits for backward
    assert saved_vocab_wide("chunked") == []
