"""Packed attention is exact for every model family: tiny random models of each, built from
transformers' own config classes, against the same samples run one by one through the model's
own eager attention, and `finetune train` packed against padded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from finetune.config import FinetuneConfig
from finetune.data.packing import collate_packed, collate_padded
from finetune.errors import PackingError
from finetune.model.adapters import linear_module_names
from finetune.train import train
from finetune.train.attention import PER_SAMPLE_ATTENTION, register_attention
from finetune.train.attention_choice import choose_attention
from finetune.train.loss import kept_token_loss

WINDOW = 8  # every sliding window below; the samples are longer (and some shorter)
COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    # Peaked attention: with the default 0.02 a random model's attention is nearly uniform
    # and two attention paths can agree on the loss while differing in gradients.
    "initializer_range": 0.25,
}
FAMILIES = {
    "llama": ("LlamaConfig", {"num_hidden_layers": 2}),
    "mistral": ("MistralConfig", {"num_hidden_layers": 2, "sliding_window": WINDOW}),
    "qwen2": (
        "Qwen2Config",
        {
            "num_hidden_layers": 4,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 2,
        },
    ),
    "qwen3": (
        "Qwen3Config",
        {
            "num_hidden_layers": 4,
            "head_dim": 16,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 2,
        },
    ),
    "gemma2": (  # soft-capping on every layer, sliding window on alternate ones
        "Gemma2Config",
        {
            "num_hidden_layers": 2,
            "head_dim": 16,
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 5.0,  # low enough to bend these peaked scores
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {
            "num_hidden_layers": 2,
            "head_dim": 16,
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": (
        "Phi3Config",
        {
            "num_hidden_layers": 2,
            "sliding_window": WINDOW,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "gpt_oss": (  # attention sinks, alternating sliding layers, experts
        "GptOssConfig",
        {
            "num_hidden_layers": 2,
            "head_dim": 16,
            "sliding_window": WINDOW,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "llama4": (  # chunked attention: only the mask carries it, so packing uses that mask
        "Llama4TextConfig",
        {
            "num_hidden_layers": 4,
            "head_dim": 16,
            "intermediate_size_mlp": 128,
            "num_local_experts": 2,
            "attention_chunk_size": WINDOW,
            "no_rope_layer_interval": 2,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
}
# The window-like pattern each family must show in its own eager attention, so a family whose
# window silently stopped applying does not pass as "exact" on plain causal attention.
WINDOWED = {"mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_oss", "llama4"}


def family_config(family: str, vocab_size: int, **overrides):
    class_name, options = FAMILIES[family]
    return getattr(transformers, class_name)(
        vocab_size=vocab_size, **{**COMMON, **options, **overrides}
    )


def run_config(**options) -> FinetuneConfig:
    values = {"base_model": "unused", "datasets": [{"path": "unused.jsonl", "type": "alpaca"}]}
    return FinetuneConfig(**{**values, **options})


def lora_model(model_config, attention: str, seed: int = 0):
    """The family's model with LoRA on every linear layer, adapter B made non-zero."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation=attention).float()
    targets = linear_module_names(model)  # what lora_target_linear adapts
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def token_samples(vocab_size: int, seed: int = 0) -> list[dict]:
    """Samples longer than the window (and two shorter), prompts masked."""
    rng = np.random.default_rng(seed)
    samples = []
    for n, prompt in [(23, 5), (6, 2), (31, 9), (12, 4), (4, 1), (19, 3)]:
        ids = rng.integers(3, vocab_size, n).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return samples


def adapter_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def one_by_one(model, samples: list[dict], total: int) -> tuple[float, dict]:
    """The independent reference: each sample alone, token-weighted loss, summed gradients."""
    weighted = 0.0
    for sample in samples:
        loss, _, _ = kept_token_loss(model, collate_padded([sample], 0), num_items_in_batch=total)
        loss.backward()
        weighted += loss.item()
    return weighted, adapter_grads(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_step_equals_samples_one_by_one_in_eager(family):
    register_attention()
    vocab = 256
    model_config = family_config(family, vocab)
    decision = choose_attention(run_config(sample_packing=True), model_config)
    model = lora_model(model_config, decision.implementation)
    samples = token_samples(vocab)

    packed_loss, _, count = kept_token_loss(model, collate_packed(samples, pad_token_id=0))
    packed_loss.backward()
    packed_grads = adapter_grads(model)

    reference = lora_model(family_config(family, vocab), "eager")
    reference.load_state_dict(model.state_dict())
    weighted, reference_grads = one_by_one(reference, samples, int(count))

    assert abs(packed_loss.item() - weighted) / weighted <= 1e-5
    assert packed_grads.keys() == reference_grads.keys()
    assert sum("lora_A" in name for name in packed_grads) >= 8
    for name, grad in packed_grads.items():
        assert relative(grad, reference_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_the_window_matters_in_these_samples(family):
    """The reference above would also pass a path that ignored the window if the window did
    not change these samples; it does (the same model without it gives another loss)."""
    vocab = 256
    samples = token_samples(vocab)
    batch = collate_padded(samples[2:3], 0)  # 31 tokens, window 8
    losses = []
    for window in (WINDOW, 64):
        options = {"attention_chunk_size": window} if family == "llama4" else {}
        if family != "llama4":
            options["sliding_window"] = window
        model = lora_model(family_config(family, vocab, **options), "eager")
        losses.append(kept_token_loss(model, batch)[0].item())
    assert abs(losses[0] - losses[1]) / losses[1] > 1e-3


def test_padded_batches_through_the_per_sample_attention_match_eager():
    """Eval batches that are padded, in a run that packs, go through the same attention: with
    soft-capping (Gemma 2) and sinks (gpt-oss) its masked path must match eager too."""
    register_attention()
    vocab = 256
    samples = token_samples(vocab, seed=3)
    for family in ("gemma2", "gpt_oss", "mistral"):
        model = lora_model(family_config(family, vocab), PER_SAMPLE_ATTENTION)
        reference = lora_model(family_config(family, vocab), "eager")
        reference.load_state_dict(model.state_dict())
        batch = collate_padded(samples, 0)
        ours, _, _ = kept_token_loss(model, batch)
        theirs, _, _ = kept_token_loss(reference, batch)
        assert abs(ours.item() - theirs.item()) / theirs.item() <= 1e-5, family


# --- the decision ------------------------------------------------------------------------


def decide(family: str, **options):
    return choose_attention(run_config(**options), family_config(family, 256))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma2", "gemma3", "gpt_oss"])
def test_packing_attends_per_sample(family):
    choice = decide(family, sample_packing=True)
    assert choice.implementation == PER_SAMPLE_ATTENTION and choice.packed and choice.eval_packed


def test_the_decision_says_what_it_honours():
    assert "sliding window 8 on 1 of 2 layers" in decide("gemma2", sample_packing=True).reason
    assert "soft-capping 5" in decide("gemma2", sample_packing=True).reason
    assert "sliding window 8 on 2 of 4 layers" in decide("qwen2", sample_packing=True).reason


def test_chunked_attention_falls_back_to_the_models_own_attention_with_a_packed_mask():
    choice = decide("llama4", sample_packing=True)
    assert choice.implementation == "sdpa" and choice.packed
    assert "chunked_attention comes only through the mask" in choice.reason


def test_models_without_sdpa_get_eager_when_not_packing():
    assert decide("gemma2").implementation == "eager"
    assert decide("gpt_oss").implementation == "eager"
    assert decide("llama").implementation == "sdpa"
    assert not decide("llama").packed


def test_eager_asks_for_the_models_own_attention_except_where_its_mask_cannot_pack():
    assert decide("mistral", sample_packing=True, attn_implementation="eager").implementation == (
        "eager"
    )
    gpt_oss = decide("gpt_oss", sample_packing=True, attn_implementation="eager")
    assert gpt_oss.implementation == PER_SAMPLE_ATTENTION
    assert "cannot isolate packed samples" in gpt_oss.reason


def test_bidirectional_attention_refuses_packing():
    config = family_config("gemma3", 256, use_bidirectional_attention=True)
    with pytest.raises(PackingError, match="sample_packing: false"):
        choose_attention(run_config(sample_packing=True), config)


def test_an_attention_keyword_it_does_not_know_is_an_error():
    from finetune.errors import UnsupportedAttentionError
    from finetune.train.attention import per_sample_attention_forward

    module = torch.nn.Linear(1, 1)
    q = torch.randn(1, 4, 6, 16)
    with pytest.raises(UnsupportedAttentionError, match="position_bias"):
        per_sample_attention_forward(module, q, q, q, None, position_bias=torch.zeros(1))


# --- `finetune train`: packed and padded first losses agree --------------------------------

SAMPLES = Path(__file__).parents[2] / "data" / "samples"
TRAIN_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_oss"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, smollm2_tokenizer):
    """Each family as a saved checkpoint with SmolLM2's tokenizer (hidden 64, window 8)."""
    folders = {}
    for family in TRAIN_FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        ids = {
            "bos_token_id": smollm2_tokenizer.bos_token_id,
            "eos_token_id": smollm2_tokenizer.eos_token_id,
            "pad_token_id": smollm2_tokenizer.pad_token_id,
        }
        config = family_config(family, len(smollm2_tokenizer), **ids)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        smollm2_tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


def first_loss(tmp_path: Path, model_dir: Path, packed: bool) -> float:
    config = FinetuneConfig(
        base_model=str(model_dir),
        datasets=[{"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"}],
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_linear=True,
        sample_packing=packed,
        sequence_len=512,
        micro_batch_size=16,  # one optimizer step holds every sample, packed or padded
        max_steps=1,
        learning_rate=0.0,
        bf16=False,
        logging_steps=1,
        save_steps=1000,
        output_dir=str(tmp_path / ("packed" if packed else "padded")),
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    said: list[str] = []
    result = train(config, log=said.append)
    attention = [line for line in said if line.startswith("attention: ")]
    assert len(attention) == 1  # said once, at the start
    assert ("attend per sample" in attention[0]) == packed, attention
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)] == [1]
    return result.final_loss


@pytest.mark.parametrize("family", TRAIN_FAMILIES)
def test_finetune_train_packed_first_loss_equals_padded(tmp_path, family_dirs, family):
    packed = first_loss(tmp_path, family_dirs[family], packed=True)
    padded = first_loss(tmp_path, family_dirs[family], packed=False)
    assert abs(packed - padded) / padded <= 1e-4
