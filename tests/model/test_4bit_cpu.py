"""QLoRA on CPUs with AVX512-BF16: bitsandbytes repacks a 4-bit layer for a bf16 kernel (which
has no backward) the first time it runs in eval mode. An evaluation during training must not
change the gradients of the steps after it. Here bitsandbytes is told it runs on such a CPU
(its kernel has a fallback on CPUs without the instructions), so the test bites on any machine."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.model.adapters import attach_adapter
from finetune.model.load import load_model, load_tokenizer

SAMPLES = Path(__file__).parents[2] / "data" / "samples"


@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def qlora_model(tmp_path: Path, model_dir: Path):
    config = FinetuneConfig(
        base_model=str(model_dir),
        datasets=[{"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"}],
        adapter="qlora",
        load_in_4bit=True,
        lora_target_linear=True,
        output_dir=str(tmp_path / "out"),
    )
    torch.manual_seed(0)
    model = attach_adapter(load_model(config, load_tokenizer(config)), config, log=lambda m: None)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter something to differ by
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def gradients(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_an_evaluation_does_not_change_later_qlora_gradients(
    tmp_path, request, family, avx512_bf16_cpu
):
    model_dir = request.getfixturevalue("tiny_model_dir" if family == "llama" else "tiny_qwen2_dir")
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    model = qlora_model(tmp_path, model_dir)
    before = gradients(model, ids)
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits
    after = gradients(model, ids)
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # and the evaluation computed in the compute dtype (fp32), as training does
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eval_logits, rtol=1e-5, atol=1e-5)
