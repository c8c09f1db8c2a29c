"""Several processes on one CPU machine: DDP, DeepSpeed ZeRO-2/3 and a two-"node" run over
loopback each train the same adapter as one process does with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def run(command: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def train_on_two_processes(config: Path, cwd: Path) -> str:
    port = str(free_port())
    return run(
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
        # Adam amplifies the last-bit differences of a distributed all-reduce where a gradient
        # is near zero (m / sqrt(v) of noise): on an AMD EPYC one element of 512 moved 1.3e-4.
        # A real difference (a sample dropped, doubled or mis-averaged) moves most elements by
        # about a step of the learning rate (5e-3): a tenth of that anywhere, and on average
        # the last bits only.
        difference = (trained[key].float() - tensor.float()).abs()
        assert difference.max() < 5e-4, (key, difference.max())
        assert difference.mean() < 1e-5, (key, difference.mean())
    lines = (output / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # written once, by the main process only


@pytest.fixture(scope="module")
def sharded_model_dir(tmp_path_factory, tiny_model_dir):
    """The same tiny model saved in several checkpoint files, as large models come."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sharded-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(folder, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


@pytest.mark.parametrize("deepspeed", [None, "zero2", "zero3"], ids=["ddp", "zero2", "zero3"])
def test_two_processes_train_the_same_adapter(
    tmp_path, tiny_model_dir, sharded_model_dir, reference, deepspeed
):
    options = {"deepspeed": deepspeed} if deepspeed else {}  # bundled configs, by name
    # ZeRO-3 fills its partitions shard by shard (finetune.model.zero3_load): a checkpoint in
    # several files, whose every tensor must land where transformers' loader would put it.
    model_dir = sharded_model_dir if deepspeed == "zero3" else tiny_model_dir
    config = write_config(tmp_path, model_dir, tmp_path / "prepared", **options)
    output = train_on_two_processes(config, tmp_path)
    assert_same_adapter(tmp_path / "out", reference)
    if deepspeed == "zero3":
        assert "copied into the partitions" in output, output[-3000:]


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


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_deepspeed_in_one_process_without_a_launcher(
    tmp_path, tiny_model_dir, reference, checkpointing
):
    """ZeRO-2 in one process, with and without (non-reentrant) gradient checkpointing: the
    adapter of the plain one-process run."""
    config = write_config(
        tmp_path,
        tiny_model_dir,
        tmp_path / "prepared",
        micro_batch_size=2,
        deepspeed="zero2",
        gradient_checkpointing=checkpointing,
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
        deepspeed="zero3",
    )
    train_on_two_processes(config, tmp_path)
    trained = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert trained.keys() == reference.keys()
    assert all(trained[k].abs().max() > 0 for k in trained if "lora_B" in k)  # B started at 0


def _metrics(output: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_log_the_one_process_loss_tokens_and_eval(tmp_path, tiny_model_dir):
    """Same global batch, one process or two: the same logged loss (a uniform scale error in
    the loss or gradients would show here, where Adam would hide it in the adapter), the same
    trained-token counts (summed over processes, not multiplied), and the same eval loss on an
    eval set smaller than the number of processes x batch (every sample evaluated once)."""
    # Plain SGD with a large step: the loss moves in proportion to the gradient (Adam would
    # normalise a scale error away and amplify all-reduce rounding into visible differences).
    options = {
        "val_set_size": 3,
        "evals_per_epoch": 1,
        # 5 training samples: two full global batches. (A third step would hold the epoch's
        # last sample, alone on one process and beside a repeated one on two, as in HF's
        # distributed sampler, so that its loss legitimately differs.)
        "max_steps": 2,
        "optimizer": "sgd",
        "learning_rate": 0.5,
        "warmup_steps": 0,
    }
    one = write_config(
        tmp_path / "one",
        tiny_model_dir,
        tmp_path / "one" / "prepared",
        micro_batch_size=2,
        **options,
    )
    run([sys.executable, "-m", "finetune", "train", str(one)], tmp_path)
    two = write_config(tmp_path / "two", tiny_model_dir, tmp_path / "two" / "prepared", **options)
    train_on_two_processes(two, tmp_path)
    single, double = _metrics(tmp_path / "one" / "out"), _metrics(tmp_path / "two" / "out")

    def series(records: list[dict], key: str) -> list:
        return [record[key] for record in records if key in record]

    for key in ("loss", "eval_loss"):
        pairs = list(zip(series(single, key), series(double, key), strict=True))
        assert pairs and all(abs(a - b) <= 1e-5 * max(1, abs(a)) for a, b in pairs), (key, pairs)
    losses = series(single, "loss")
    assert abs(losses[-1] - losses[0]) > 1e-3, losses  # training moved the loss
    assert series(single, "trained_tokens") == series(double, "trained_tokens")


POISON = """
import os, sys, torch
from transformers import TrainerCallback
from finetune.config import load_config
from finetune.train import train

class PoisonOneRank(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2 and os.environ["RANK"] == "1":
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.fill_(float("nan"))

train(load_config(sys.argv[1]).config, callbacks=[PoisonOneRank()])
"""


def test_a_nan_on_one_process_stops_every_process_at_the_same_step(tmp_path, tiny_model_dir):
    config = write_config(
        tmp_path, tiny_model_dir, tmp_path / "prepared", max_steps=6, ddp_timeout=600
    )
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        torchrun(
            "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), str(config)
        ),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang would wait for ddp_timeout (600 s)
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "the loss became nan at step 3" in output, output[-3000:]  # the poisoned process
    assert "the loss became not finite on another process at step 3" in output  # the other


ZERO3_SHARDS = """
import json, os, sys
from transformers import TrainerCallback
from finetune.config import load_config
from finetune.train import train

class CountShards(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        local = total = 0
        for param in model.parameters():
            if hasattr(param, "ds_numel"):
                local += param.ds_tensor.numel()
                total += param.ds_numel
        with open(f"shards-{os.environ['RANK']}.json", "w") as handle:
            json.dump({"local": local, "total": total}, handle)

train(load_config(sys.argv[1]).config, callbacks=[CountShards()])
"""


def test_qlora_under_zero3_holds_half_of_the_parameters_per_process(tmp_path, tiny_model_dir):
    config = write_config(
        tmp_path,
        tiny_model_dir,
        tmp_path / "prepared",
        adapter="qlora",
        load_in_4bit=True,
        deepspeed="zero3",
        max_steps=1,
    )
    script = tmp_path / "shards.py"
    script.write_text(ZERO3_SHARDS)
    run(
        torchrun(
            "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), str(config)
        ),
        tmp_path,
    )
    import json

    counts = [json.loads((tmp_path / f"shards-{rank}.json").read_text()) for rank in (0, 1)]
    for count in counts:
        assert count["total"] > 0
        assert 0.45 <= count["local"] / count["total"] <= 0.55, counts
