"""Trained embeddings and lm_head (`lora_modules_to_save`, needed for new tokens) keep float32
master weights whatever the compute dtype, so small updates are not rounded away in bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import FinetuneConfig
from finetune.model.adapters import attach_adapter
from finetune.model.load import load_model, load_tokenizer
from finetune.train import train

SAMPLES = Path(__file__).parents[2] / "data" / "samples"
SAVED = ["embed_tokens", "lm_head"]


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, save_tiny_llama) -> Path:
    """A 2-layer Llama whose lm_head is its own matrix (not tied to the embeddings)."""
    return save_tiny_llama(tmp_path_factory.mktemp("untied-llama"), tie_word_embeddings=False)


def bf16_config(tmp_path: Path, model_dir: Path, **options) -> FinetuneConfig:
    values = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"}],
        "adapter": "lora",
        "lora_target_linear": True,
        "lora_modules_to_save": SAVED,
        "bf16": True,
        "micro_batch_size": 4,
        "max_steps": 1,
        "save_steps": 1000,
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
    }
    return FinetuneConfig(**{**values, **options})


def test_trained_copies_are_float32_and_the_frozen_base_stays_bf16(tmp_path, untied_model_dir):
    config = bf16_config(tmp_path, untied_model_dir)
    model = attach_adapter(
        load_model(config, load_tokenizer(config)), config, log=lambda message: None
    )
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    copies = {n: dtype for n, dtype in trained.items() if "modules_to_save" in n}
    assert sorted(n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in copies) == SAVED
    assert set(trained.values()) == {torch.float32}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}


def test_a_tiny_update_to_lm_head_is_not_lost_to_bf16_rounding(tmp_path, untied_model_dir):
    # One Adam step moves every lm_head weight by about learning_rate = 1e-5, below half a bf16
    # step for most of these weights (N(0, 0.02)): in bf16 those updates would round away.
    config = bf16_config(tmp_path, untied_model_dir, learning_rate=1e-5)
    base = load_file(untied_model_dir / "model.safetensors")["lm_head.weight"]
    start = base.to(torch.bfloat16).float()  # what training started from (loaded in bf16)
    train(config, log=lambda message: None)

    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    trained = saved["base_model.model.lm_head.weight"]
    assert trained.dtype == torch.float32
    step = (trained - start).abs()
    assert (step > 0).float().mean() > 0.9  # nearly every weight moved...
    assert step.max() < 2e-5  # ...by about the learning rate...
    assert (trained.to(torch.bfloat16).float() == start).float().mean() > 0.75  # ...below bf16


def test_attaching_an_adapter_prints_no_library_deprecation_warning(tmp_path, untied_model_dir):
    import warnings

    config = bf16_config(tmp_path, untied_model_dir)
    model = load_model(config, load_tokenizer(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach_adapter(model, config, log=lambda message: None)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def _saved_bytes_loss_and_grads(model, ids):
    """One bf16 autocast forward and backward: the bytes autograd keeps for the backward pass
    (distinct storages), the loss and the adapter's gradients."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad()
    keep = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with torch.autocast("cpu", dtype=torch.bfloat16), keep:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return sum(storages.values()), loss.detach(), grads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_under_autocast_lora_keeps_no_copy_of_its_input_and_trains_the_same(
    tmp_path, request, family, dora
):
    """peft upcasts each adapted layer's input to the adapter's float32 and autocast casts it
    back: an exact round trip that leaves more bf16 copies for the backward pass. Without it,
    loss and gradients are bit-identical to peft's own and less is kept. DoRA, whose result the
    cast does change, keeps it: bit-identical to peft's own. (The reference gets the fused
    LoRA update too, tests/model/test_fused_lora.py, so the round trip is the only difference.)"""
    from peft import get_peft_model

    from finetune.model.adapters import keep_trained_weights_in_fp32, lora_config
    from finetune.model.fused_lora import fuse_lora_updates

    model_dir = request.getfixturevalue("tiny_model_dir" if family == "llama" else "tiny_qwen2_dir")
    config = bf16_config(
        tmp_path, model_dir, lora_modules_to_save=None, peft_use_dora=dora, lora_dropout=0.0
    )
    ours = attach_adapter(load_model(config, load_tokenizer(config)), config, log=lambda m: None)
    base = load_model(config, load_tokenizer(config))
    peft_own = get_peft_model(base, lora_config(config, base))  # the reference: peft as is
    keep_trained_weights_in_fp32(peft_own)
    fuse_lora_updates(peft_own)
    torch.manual_seed(1)  # B is zero at initialisation: give the adapter a real contribution
    trained = {n: torch.randn_like(p) * 0.1 for n, p in ours.named_parameters() if p.requires_grad}
    for model in (ours, peft_own):
        model.load_state_dict(trained, strict=False)
    ids = torch.randint(0, 1000, (2, 24))

    ours_bytes, ours_loss, ours_grads = _saved_bytes_loss_and_grads(ours, ids)
    peft_bytes, peft_loss, peft_grads = _saved_bytes_loss_and_grads(peft_own, ids)

    assert torch.equal(ours_loss, peft_loss)
    assert ours_grads.keys() == peft_grads.keys() and len(ours_grads) > 0
    for name, grad in ours_grads.items():
        assert torch.equal(grad, peft_grads[name]), name
    if not dora:  # peft's own keeps 3 more bf16 copies of a (2 x 24 x 64) input per decoder layer
        assert peft_bytes - ours_bytes >= 2 * 3 * (2 * 24 * 64) * 2


def test_outside_autocast_a_bf16_input_still_meets_float32_adapters(tmp_path, tiny_model_dir):
    """The round trip is skipped only under autocast: a bf16 model run without it (as a user
    might for generation) still gets peft's cast to the float32 adapter instead of an error."""
    config = bf16_config(tmp_path, tiny_model_dir, lora_modules_to_save=None)
    model = attach_adapter(load_model(config, load_tokenizer(config)), config, log=lambda m: None)
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
