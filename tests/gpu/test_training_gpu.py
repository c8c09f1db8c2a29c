"""On CUDA: `finetune train` in bf16, in fp16 (through the GradScaler) and as QLoRA on CUDA
bitsandbytes, each saving a PEFT adapter that trained; the QLoRA adapter merges with
`finetune merge --nf4-roundtrip` and passes the merge's own check against base + adapter.

Runs use one GPU (CUDA_VISIBLE_DEVICES=0) in their own processes. Run with `make test-gpu`;
without CUDA every test here is reported as skipped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SAMPLES = Path(__file__).parents[2] / "data" / "samples"

# `finetune train` with a callback that reports what the step ran with.
WATCHED_TRAIN = """
import json, sys
from transformers import TrainerCallback
from finetune.config import load_config
from finetune.train import train

seen = {}

class Watch(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)  # Accelerate's optimizer wrapper
        seen["scaler"] = scaler is not None and scaler.is_enabled()
        seen["scale"] = scaler.get_scale() if seen["scaler"] else None
        params = list(model.named_parameters())
        seen["trained_dtypes"] = sorted({str(p.dtype) for _, p in params if p.requires_grad})
        seen["frozen_dtypes"] = sorted({str(p.dtype) for _, p in params if not p.requires_grad})
        seen["devices"] = sorted({str(p.device) for _, p in params})
        seen["linear4bit"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())

result = train(load_config(sys.argv[1]).config, callbacks=[Watch()])
seen["final_loss"] = result.final_loss
with open(sys.argv[2], "w") as handle:
    json.dump(seen, handle)
"""


def one_gpu_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "CUDA_VISIBLE_DEVICES": "0"}


def write_config(folder: Path, model_dir: Path, **options) -> Path:
    values = {
        "base_model": str(model_dir),
        "datasets": [
            {"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"},
            {"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"},
        ],
        "adapter": "lora",
        "lora_target_linear": True,
        "micro_batch_size": 2,
        "max_steps": 6,
        "learning_rate": 5e-3,
        "save_steps": 1000,
        "output_dir": str(folder / "out"),
        "dataset_prepared_path": str(folder / "prepared"),
        **options,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def watched_train(folder: Path, config: Path) -> dict:
    script = folder / "watched_train.py"
    script.write_text(WATCHED_TRAIN)
    seen = folder / "seen.json"
    result = subprocess.run(
        [sys.executable, str(script), str(config), str(seen)],
        cwd=folder,
        env=one_gpu_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(seen.read_text())


def assert_trained_adapter(output: Path) -> None:
    adapter = load_file(output / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at 0
    losses = [
        json.loads(line)["loss"]
        for line in (output / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_bf16_trains_and_saves(tmp_path, tiny_model_dir):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    seen = watched_train(tmp_path, write_config(tmp_path, tiny_model_dir, bf16=True))
    assert seen["devices"] == ["cuda:0"]
    assert seen["frozen_dtypes"] == ["torch.bfloat16"]
    assert seen["trained_dtypes"] == ["torch.float32"]  # master weights; autocast computes bf16
    assert not seen["scaler"]
    assert_trained_adapter(tmp_path / "out")


def test_fp16_trains_through_the_grad_scaler_and_saves(tmp_path, tiny_model_dir):
    seen = watched_train(tmp_path, write_config(tmp_path, tiny_model_dir, bf16=False, fp16=True))
    assert seen["frozen_dtypes"] == ["torch.float16"]
    # The GradScaler refuses to unscale fp16 gradients: the trained weights must be fp32.
    assert seen["trained_dtypes"] == ["torch.float32"]
    assert seen["scaler"] and math.isfinite(seen["scale"]) and seen["scale"] > 0
    assert_trained_adapter(tmp_path / "out")


def test_qlora_on_cuda_bitsandbytes_trains_and_merges_with_nf4_roundtrip(tmp_path, tiny_model_dir):
    bf16 = torch.cuda.is_bf16_supported()
    config = write_config(
        tmp_path,
        tiny_model_dir,
        adapter="qlora",
        load_in_4bit=True,
        bf16=bf16,
        fp16=not bf16,
    )
    seen = watched_train(tmp_path, config)
    assert seen["linear4bit"] > 0 and seen["devices"] == ["cuda:0"]
    assert seen["trained_dtypes"] == ["torch.float32"]
    assert_trained_adapter(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    storage = record["quantization"]["bnb_4bit_quant_storage"]
    assert storage == ("bfloat16" if bf16 else "float16")  # = the compute dtype

    result = subprocess.run(
        [sys.executable, "-m", "finetune", "merge", str(config), "--nf4-roundtrip", "--verify"],
        cwd=tmp_path,
        env=one_gpu_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "verified: max |logit difference|" in output
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
