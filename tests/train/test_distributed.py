"""Several processes on one CPU machine: DDP, DeepSpeed ZeRO-2/3 and a two-"node" run over
loopback each train the same adapter as one process does with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.train.launch import free_port

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "data" / "samples"


def write_config(folder: Path, model_dir: Path, prepared: Path, **options) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = {
        "base_model": str(model_dir),
        "datasets": [
            {"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"},
            {"path": str(SAMPLES / "qa.jsonl"), "type": "alpaca_chat.load_qa"},
            {"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"},
        ],
        "adapter": "lora",
        "lora_target_linear": True,
        "micro_batch_size": 1,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "bf16": False,
        "save_steps": 1000,
        "output_dir": str(folder / "out"),
        "dataset_prepared_path": str(prepared),
        **options,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run(command: list[str], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def train_on_two_processes(config: Path, cwd: Path) -> None:
    port = str(free_port())
    run(
        torchrun(
            "--nproc_per_node", "2", "--master_port", port, "-m", "finetune", "train", str(config)
        ),
        cwd,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """One process, two samples per step: what every multi-process run must reproduce."""
    folder = tmp_path_factory.mktemp("single")
    config = write_config(folder, tiny_model_dir, folder / "prepared", micro_batch_size=2)
    run([sys.executable, "-m", "finetune", "train", str(config)], folder)
    return load_file(folder / "out" / "adapter_model.safetensors")


def assert_same_adapter(output: Path, reference: dict) -> None:
    trained = load_file(output / "adapter_model.safetensors")
    assert trained.keys() == reference.keys()
    for key, tensor in reference.items():
        # Adam amplifies the last-bit differences of a distributed all-reduce a little.
        torch.testing.assert_close(trained[key].float(), tensor.float(), rtol=0, atol=1e-4)
    lines = (output / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # written once, by the main process only


@pytest.mark.parametrize(
    "deepspeed", [None, "zero2.json", "zero3.json"], ids=["ddp", "zero2", "zero3"]
)
def test_two_processes_train_the_same_adapter(tmp_path, tiny_model_dir, reference, deepspeed):
    options = {"deepspeed": str(ROOT / "deepspeed_configs" / deepspeed)} if deepspeed else {}
    config = write_config(tmp_path, tiny_model_dir, tmp_path / "prepared", **options)
    train_on_two_processes(config, tmp_path)
    assert_same_adapter(tmp_path / "out", reference)


def test_two_nodes_over_loopback(tmp_path, tiny_model_dir, reference):
    config = write_config(tmp_path, tiny_model_dir, tmp_path / "prepared")
    endpoint = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    nodes = [
        subprocess.Popen(
            torchrun(
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "finetune-test",
                "-m",
                "finetune",
                "train",
                str(config),
            ),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_adapter(tmp_path / "out", reference)


def test_deepspeed_in_one_process_without_a_launcher(tmp_path, tiny_model_dir, reference):
    config = write_config(
        tmp_path,
        tiny_model_dir,
        tmp_path / "prepared",
        micro_batch_size=2,
        deepspeed=str(ROOT / "deepspeed_configs" / "zero2.json"),
    )
    run([sys.executable, "-m", "finetune", "train", str(config)], tmp_path)
    assert_same_adapter(tmp_path / "out", reference)


def test_num_processes_relaunches_itself(tmp_path, tiny_model_dir, reference):
    config = write_config(tmp_path, tiny_model_dir, tmp_path / "prepared")
    run([sys.executable, "-m", "finetune", "train", str(config), "--num-processes", "2"], tmp_path)
    assert_same_adapter(tmp_path / "out", reference)


def test_qlora_under_zero3_with_two_processes(tmp_path, tiny_model_dir, reference):
    """4-bit weights stored in the compute dtype can be sharded by ZeRO-3."""
    config = write_config(
        tmp_path,
        tiny_model_dir,
        tmp_path / "prepared",
        adapter="qlora",
        load_in_4bit=True,
        deepspeed=str(ROOT / "deepspeed_configs" / "zero3.json"),
    )
    train_on_two_processes(config, tmp_path)
    trained = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert trained.keys() == reference.keys()
    assert all(trained[k].abs().max() > 0 for k in trained if "lora_B" in k)  # B started at 0
