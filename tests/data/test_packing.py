"""Sample packing: dense bins, exact step counts, and no leaking between packed samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.data.packing import (
    BatchPlan,
    PackingError,
    collate_packed,
    collate_padded,
    pack_into_bins,
    packing_efficiency,
)
from finetune.train.attention import PER_SAMPLE_ATTENTION, register_attention
from finetune.train.loss import kept_token_loss


def lognormal_lengths(n: int, mean: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigma = 0.6
    return np.clip(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n), 8, 2048).astype(int)


def test_bins_hold_every_sample_once_and_never_overflow():
    lengths = lognormal_lengths(3000, 200)
    bins = pack_into_bins(lengths, 2048, seed=0)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 2048


def test_packing_is_dense_at_2048():
    lengths = lognormal_lengths(20000, 200)
    bins = pack_into_bins(lengths, 2048, seed=0)
    assert packing_efficiency(lengths, bins, 2048) >= 0.99


def test_same_seed_same_bins():
    lengths = lognormal_lengths(500, 150)
    assert pack_into_bins(lengths, 1024, 3) == pack_into_bins(lengths, 1024, 3)


def test_plan_length_is_known_up_front_and_epochs_reshuffle():
    lengths = lognormal_lengths(400, 150)
    plan = BatchPlan(lengths, micro_batch_size=2, capacity=1024, packed=True, seed=1)
    first = list(plan)
    assert len(first) == len(plan)
    plan.set_epoch(1)
    second = list(plan)
    assert len(second) == len(plan)
    assert first != second
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b)
    plan.set_epoch(0)
    assert list(plan) == first


@pytest.mark.parametrize("packed", [True, False])
def test_ranks_get_equal_batch_counts_from_disjoint_samples(packed):
    lengths = lognormal_lengths(301, 150)
    plans = [
        BatchPlan(lengths, 3, 1024, packed=packed, seed=0, rank=r, world_size=2) for r in range(2)
    ]
    batches = [list(p) for p in plans]
    assert len(batches[0]) == len(batches[1]) == len(plans[0])
    seen = [{i for b in rank for i in b} for rank in batches]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= len(lengths) - (
        1 if not packed else max(map(len, plans[0].groups))
    )


def test_too_little_data_for_the_processes_is_a_clear_error():
    with pytest.raises(PackingError, match="cannot give each of 4 processes a batch"):
        BatchPlan([10, 12], 1, 64, packed=False, seed=0, world_size=4)


def test_packed_row_restarts_positions_and_has_no_attention_mask():
    samples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [-100, 9]},
    ]
    batch = collate_packed(samples, pad_token_id=0, pad_to=8)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]


# --- the loss of a packed step equals the per-sample reference --------------------------


def _tiny_lora_model(attn: str, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def _samples(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = []
    for n, prompt in [(9, 4), (17, 6), (5, 2), (31, 10), (12, 3)]:
        ids = rng.integers(1, 97, n).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return samples


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_one_by_one(attn):
    register_attention()
    # What a packed run uses: our per-sample SDPA for sdpa, the block mask for eager.
    model = _tiny_lora_model(PER_SAMPLE_ATTENTION if attn == "sdpa" else attn).float()
    samples = _samples()

    packed_loss, _, count = kept_token_loss(model, collate_packed(samples, pad_token_id=0))
    packed_loss.backward()
    packed_grads = _adapter_grads(model)

    # The independent reference: each sample alone, stock attention, loss weighted by tokens.
    reference = _tiny_lora_model(attn).float()
    reference.load_state_dict(model.state_dict())
    total = int(count)
    weighted = 0.0
    for sample in samples:
        batch = collate_padded([sample], pad_token_id=0)
        loss, _, n = kept_token_loss(reference, batch, num_items_in_batch=total)
        loss.backward()
        weighted += loss.item()
    reference_grads = _adapter_grads(reference)

    assert abs(packed_loss.item() - weighted) / weighted <= 1e-5
    assert packed_grads.keys() == reference_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_padded_batch_loss_equals_packed():
    register_attention()
    model = _tiny_lora_model(PER_SAMPLE_ATTENTION).float()
    samples = _samples(1)
    packed, _, _ = kept_token_loss(model, collate_packed(samples, pad_token_id=0))
    padded, _, _ = kept_token_loss(model, collate_padded(samples, pad_token_id=0))
    assert abs(packed.item() - padded.item()) / padded.item() <= 1e-5
