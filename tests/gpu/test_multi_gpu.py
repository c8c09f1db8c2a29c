"""On two CUDA GPUs: DDP, DeepSpeed ZeRO-3 and FSDP2 (through Accelerate, the path a CPU cannot
take) train the adapter one GPU trains with the same global batch; FSDP2 really shards (each
process holds half of the trained weights), and its adapter is saved whole and merges.

fp32 with TF32 off, so that the runs agree to 1e-4 as on CPU (tests/train/test_distributed.py);
a bf16 FSDP2 QLoRA run (4-bit weights stored in bf16, the Answer.AI recipe) is checked against
the one-GPU loss instead. Run with `make test-gpu`; without two GPUs every test here is
reported as skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.train.launch import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
    ),
]

SAMPLES = Path(__file__).parents[2] / "data" / "samples"
ADAPTERS = {
    "lora": {"adapter": "lora"},
    "dora": {"adapter": "lora", "peft_use_dora": True},
    "qlora": {"adapter": "qlora", "load_in_4bit": True},
}
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_state_dict_type": "FULL_STATE_DICT",
    },
}

# `finetune train` that also reports how much of the trained weights this process holds.
COUNTED_TRAIN = """
import json, os, sys
from transformers import TrainerCallback
from finetune.config import load_config
from finetune.train import train

class CountShards(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        local = total = 0
        for param in model.parameters():
            if param.requires_grad:
                local += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
                total += param.numel()
        with open(f"shards-{os.environ.get('RANK', '0')}.json", "w") as handle:
            json.dump({"local": local, "total": total}, handle)

train(load_config(sys.argv[1]).config, callbacks=[CountShards()])
"""


def environment(gpus: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "CUDA_VISIBLE_DEVICES": gpus}


def write_config(folder: Path, model_dir: Path, **options) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = {
        "base_model": str(model_dir),
        "datasets": [
            {"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"},
            {"path": str(SAMPLES / "qa.jsonl"), "type": "alpaca_chat.load_qa"},
            {"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"},
        ],
        "lora_target_linear": True,
        "micro_batch_size": 1,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "bf16": False,
        "tf32": False,
        "save_steps": 1000,
        "output_dir": str(folder / "out"),
        "dataset_prepared_path": str(folder / "prepared"),
        **options,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run(command: list[str], cwd: Path, gpus: str) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=environment(gpus), capture_output=True, text=True, timeout=1200
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def on_one_gpu(config: Path) -> None:
    run([sys.executable, "-m", "finetune", "train", str(config)], config.parent, "0")


def on_two_gpus(config: Path, script: Path | None = None) -> None:
    target = [str(script), str(config)] if script else ["-m", "finetune", "train", str(config)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run([*launcher, "--master_port", str(free_port()), *target], config.parent, "0,1")


def losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def assert_same_adapter(output: Path, reference: Path) -> None:
    expected = load_file(reference / "adapter_model.safetensors")
    trained = load_file(output / "adapter_model.safetensors")
    assert trained.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(trained[key].float(), tensor.float(), rtol=0, atol=1e-4)
    assert len(losses(output)) == 4  # logged once, by the main process


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model_dir):
    """One GPU, two samples per step, for each adapter kind."""
    done = {}
    for name, adapter in ADAPTERS.items():
        folder = tmp_path_factory.mktemp(f"one-gpu-{name}")
        on_one_gpu(write_config(folder, tiny_model_dir, micro_batch_size=2, **adapter))
        done[name] = folder / "out"
    return done


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_ddp_and_zero3_on_two_gpus_train_the_one_gpu_adapter(
    tmp_path, tiny_model_dir, references, engine
):
    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    options = {"deepspeed": "zero3"} if engine == "zero3" else {}
    config = write_config(tmp_path, tiny_model_dir, adapter="lora", **options)
    on_two_gpus(config)
    assert_same_adapter(tmp_path / "out", references["lora"])


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_fsdp2_on_two_gpus_trains_the_one_gpu_adapter_sharded(
    tmp_path, tiny_model_dir, references, adapter
):
    config = write_config(tmp_path, tiny_model_dir, **ADAPTERS[adapter], **FSDP2)
    script = tmp_path / "counted_train.py"
    script.write_text(COUNTED_TRAIN)
    on_two_gpus(config, script)
    assert_same_adapter(tmp_path / "out", references[adapter])
    for rank in (0, 1):
        count = json.loads((tmp_path / f"shards-{rank}.json").read_text())
        assert count["total"] > 0
        assert 0.4 <= count["local"] / count["total"] <= 0.6, count


def test_fsdp2_offload_rank0_loading_and_its_own_checkpointing_train_the_same_adapter(
    tmp_path, tiny_model_dir, references
):
    """offload_params (parameters, gradients and the optimizer step in CPU memory),
    cpu_ram_efficient_loading (rank 0 reads the weights, the others get them broadcast) and
    FSDP's activation checkpointing (in place of gradient_checkpointing) change where things
    are, not what is trained."""
    settings = {
        **FSDP2["fsdp_config"],
        "fsdp_offload_params": True,
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_activation_checkpointing": True,
    }
    config = write_config(
        tmp_path,
        tiny_model_dir,
        adapter="lora",
        gradient_checkpointing=True,
        fsdp_version=2,
        fsdp_config=settings,
    )
    on_two_gpus(config)
    assert_same_adapter(tmp_path / "out", references["lora"])


def test_fsdp2_adapter_loads_in_peft_and_merges(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, tiny_model_dir, adapter="lora", **FSDP2)
    on_two_gpus(config)
    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "out"
    )
    output = run(
        [sys.executable, "-m", "finetune", "merge", str(config), "--verify"], tmp_path, "0"
    )
    assert "verified: max |logit difference|" in output
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")


def test_fsdp2_qlora_in_bf16_matches_the_one_gpu_loss(tmp_path, tiny_model_dir):
    """The Answer.AI recipe: 4-bit weights stored in bf16 so FSDP2 can shard them, bf16 mixed
    precision. bf16 rounding leaves the adapters apart by more than 1e-4; the first step's
    loss (before any update) must agree, and the run must save a whole adapter."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    options = {**ADAPTERS["qlora"], "bf16": True}
    one = write_config(tmp_path / "one", tiny_model_dir, micro_batch_size=2, **options)
    on_one_gpu(one)
    two = write_config(tmp_path / "two", tiny_model_dir, **options, **FSDP2)
    on_two_gpus(two)
    first_one, first_two = losses(tmp_path / "one" / "out")[0], losses(tmp_path / "two" / "out")[0]
    assert abs(first_one - first_two) <= 1e-2 * max(1.0, abs(first_one)), (first_one, first_two)
    expected = load_file(tmp_path / "one" / "out" / "adapter_model.safetensors")
    trained = load_file(tmp_path / "two" / "out" / "adapter_model.safetensors")
    assert trained.keys() == expected.keys()
    assert all(torch.isfinite(t).all() for t in trained.values())
