"""`gradient_checkpointing`: the same loss and adapter gradients as a run without it, on a packed
row through per-sample attention, for LoRA, QLoRA and DoRA; far less kept for backward; and
`offload` refused where there is no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import set_seed

from finetune.config import FinetuneConfig
from finetune.data.packing import collate_packed
from finetune.errors import TrainingError
from finetune.model.adapters import attach_adapter
from finetune.model.load import load_model
from finetune.train import train
from finetune.train.attention import register_attention
from finetune.train.loss import kept_token_loss

FACTS = Path(__file__).parents[2] / "data" / "samples" / "quickstart_facts.jsonl"
ADAPTERS = {
    "lora": {},
    "qlora": {"adapter": "qlora", "load_in_4bit": True},
    "dora": {"peft_use_dora": True},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, save_tiny_llama):
    """A 2-layer Llama with peaked attention (initializer_range 0.25), SmolLM2's vocabulary."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-peaked"),
        max_position_embeddings=512,
        initializer_range=0.25,
        # LlamaConfig's own token ids: a pad id would zero that embedding row
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def run_config(model_dir, **options) -> FinetuneConfig:
    values = {
        "base_model": str(model_dir),
        "datasets": [{"path": "unused.jsonl", "type": "alpaca"}],
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "sample_packing": True,
        "bf16": False,
    }
    return FinetuneConfig(**{**values, **options})


def training_model(config: FinetuneConfig, tokenizer):
    """What `finetune train` builds: the loader (checkpointing set up there) and the adapter,
    with B made non-zero so that every adapter weight gets a gradient."""
    set_seed(config.seed)
    model = load_model(config, tokenizer, attn_implementation=register_attention())
    model = attach_adapter(model, config, log=lambda message: None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.train()


def packed_row(vocab_size: int) -> dict:
    rng = np.random.default_rng(0)
    samples = []
    for length, prompt in [(41, 7), (23, 5), (64, 12), (18, 3)]:
        ids = rng.integers(3, vocab_size, length).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return collate_packed(samples, pad_token_id=0)


def step(model, batch) -> tuple[float, dict[str, torch.Tensor], int]:
    """One forward + backward: the loss, the adapter gradients, and the bytes of activations
    kept for backward (parameters excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _, _ = kept_token_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, sum(kept.values())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_checkpointing_gives_the_same_loss_and_adapter_gradients(
    adapter, model_dir, smollm2_tokenizer
):
    options = ADAPTERS[adapter]
    batch = packed_row(len(smollm2_tokenizer))
    plain = training_model(run_config(model_dir, **options), smollm2_tokenizer)
    checkpointed = training_model(
        run_config(model_dir, gradient_checkpointing=True, **options), smollm2_tokenizer
    )

    expected, expected_grads, kept_plain = step(plain, batch)
    loss, grads, kept_checkpointed = step(checkpointed, batch)

    # QLoRA too: the recompute dequantizes the same 4-bit weights into the same values, and
    # both runs do the same fp32 arithmetic in the same order.
    assert abs(loss - expected) / expected <= 1e-5
    assert grads.keys() == expected_grads.keys()
    assert sum("lora_A" in name for name in grads) == 14  # 7 projections x 2 layers
    if adapter == "dora":
        assert any("lora_magnitude_vector" in name for name in grads)
    for name, grad in grads.items():
        assert relative(grad, expected_grads[name]) <= 1e-5, name
    # what checkpointing is for: most activations are recomputed, not kept
    assert kept_checkpointed < kept_plain / 3


def test_checkpointing_is_non_reentrant_unless_asked(model_dir, smollm2_tokenizer):
    """Non-reentrant by default (Axolotl's default is reentrant); the kwargs still choose."""
    for kwargs, reentrant in [(None, False), ({"use_reentrant": True}, True)]:
        config = run_config(
            model_dir, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs
        )
        model = training_model(config, smollm2_tokenizer)
        layer = model.get_base_model().model.layers[0]
        assert layer.gradient_checkpointing
        assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is reentrant
        if reentrant:  # and it trains the same
            batch = packed_row(len(smollm2_tokenizer))
            plain = training_model(run_config(model_dir), smollm2_tokenizer)
            loss, grads, _ = step(model, batch)
            expected, expected_grads, _ = step(plain, batch)
            assert abs(loss - expected) / expected <= 1e-5
            for name, grad in grads.items():
                assert relative(grad, expected_grads[name]) <= 1e-5, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_offload_is_refused_without_a_gpu(model_dir, smollm2_tokenizer):
    config = run_config(model_dir, gradient_checkpointing="offload")
    with pytest.raises(TrainingError, match="gradient_checkpointing: offload .* CUDA"):
        load_model(config, smollm2_tokenizer)


def test_finetune_train_logs_the_same_losses_with_checkpointing(model_dir, tmp_path):
    """The whole `finetune train` path (packed batches, the Trainer, evaluation) with and
    without `gradient_checkpointing: true`."""
    logged = {}
    for checkpointing in (False, True):
        config = run_config(
            model_dir,
            datasets=[{"path": str(FACTS), "type": "chat_template"}],
            gradient_checkpointing=checkpointing,
            sequence_len=256,
            micro_batch_size=2,
            max_steps=3,
            learning_rate=1e-3,
            val_set_size=0.1,
            eval_steps=3,
            logging_steps=1,
            save_steps=1000,
            output_dir=str(tmp_path / f"out-{checkpointing}"),
            dataset_prepared_path=str(tmp_path / "prepared"),
        )
        result = train(config, log=lambda message: None)
        lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        logged[checkpointing] = [r[k] for r in records for k in ("loss", "eval_loss") if k in r]

    assert len(logged[False]) == 4  # 3 training steps and 1 evaluation
    for ours, expected in zip(logged[True], logged[False], strict=True):
        assert abs(ours - expected) / expected <= 1e-5
