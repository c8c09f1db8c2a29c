"""FSDP2: Axolotl's keys, their mapping onto the HF Trainer's FSDP plugin, the refusals, and
our adapters under torch's FSDP2 on CPU processes.

What runs where (transformers 5.24, accelerate 1.15, torch 2.13): torch's FSDP2 (`fully_shard`)
trains on CPU processes over gloo, and our LoRA, DoRA and QLoRA models shard, train and gather
under it exactly as without it (the engine test below). Accelerate, which the HF Trainer goes
through, switches FSDP on only for GPU-like devices: on CPU processes it stays DDP and the
Trainer would train unsharded without a word, so `finetune train` refuses FSDP on a CPU and the
whole path through Accelerate is tested on GPUs (tests/gpu/test_multi_gpu.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.config import load_config
from finetune.errors import ConfigError, TrainingError
from finetune.train.launch import free_port

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "data" / "samples"
CORPUS = ROOT / "tests" / "fixtures" / "axolotl_examples"
MINIMAL = {
    "base_model": "unused",
    "datasets": [{"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"}],
    "adapter": "lora",
}
# What `accelerate launch` and transformers export for FSDP; restored after each test.
FSDP_ENVIRONMENT = (
    "ACCELERATE_USE_FSDP",
    "FSDP_VERSION",
    "FSDP_OFFLOAD_PARAMS",
    "FSDP_STATE_DICT_TYPE",
    "FSDP_CPU_RAM_EFFICIENT_LOADING",
)


def config_of(tmp_path: Path, **values):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, **values}, sort_keys=False))
    return load_config(path).config


def problems_of(tmp_path: Path, **values) -> dict[str, str]:
    with pytest.raises(ConfigError) as error:
        config_of(tmp_path, **values)
    return dict(error.value.problems)


@pytest.fixture
def fsdp_environment(monkeypatch):
    """The FSDP variables as they were before the test, whatever the test sets."""
    for name in FSDP_ENVIRONMENT:
        monkeypatch.setenv(name, "unset-by-test")
        monkeypatch.delenv(name)


# ------------------------------------------------------------------ Axolotl's spellings


SPELLINGS = {
    "prefixed": {
        "fsdp_version": 2,
        "fsdp_config": {
            "fsdp_offload_params": True,
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "fsdp_reshard_after_forward": False,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
        },
    },
    "plain": {
        "fsdp_version": 2,
        "fsdp_config": {
            "offload_params": True,
            "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "reshard_after_forward": False,
            "state_dict_type": "FULL_STATE_DICT",
        },
    },
    "version inside": {
        "fsdp_config": {
            "fsdp_version": 2,
            "offload_params": True,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "fsdp_reshard_after_forward": False,
            "state_dict_type": "FULL_STATE_DICT",
        },
    },
    "legacy list": {
        "fsdp_version": 2,
        "fsdp": ["shard_grad_op", "offload", "auto_wrap"],
        "fsdp_config": {
            "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "state_dict_type": "FULL_STATE_DICT",
        },
    },
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_axolotl_spellings_give_the_same_fsdp2_plugin(tmp_path, spelling, fsdp_environment):
    """Prefixed or not, version at the top or inside, the old list or the keys: one plugin."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from finetune.train.arguments import training_arguments

    config = config_of(tmp_path, **SPELLINGS[spelling])
    assert config.fsdp_version == 2
    args = training_arguments(config, tmp_path / "out", steps=1)
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is False
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.activation_checkpointing is False
    assert plugin.cpu_ram_efficient_loading is False


def test_defaults_shard_fully_with_the_models_own_layer_classes(tmp_path, fsdp_environment):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from finetune.train.arguments import training_arguments

    config = config_of(tmp_path, fsdp_version=2, fsdp_config={"activation_checkpointing": True})
    plugin = FullyShardedDataParallelPlugin(
        **training_arguments(config, tmp_path / "out", steps=1).fsdp_plugin_args
    )
    assert plugin.reshard_after_forward is True
    assert plugin.cpu_offload.__class__.__name__ == "OffloadPolicy"  # no offloading
    # None: Accelerate wraps the classes the model lists in `_no_split_modules`.
    assert plugin.transformer_cls_names_to_wrap is None
    assert plugin.activation_checkpointing is True


def test_sharded_state_dict_is_saved_whole_with_a_note(tmp_path, fsdp_environment):
    from finetune.train.arguments import training_arguments

    config = config_of(
        tmp_path, fsdp_version=2, fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"}
    )
    notes = []
    args = training_arguments(config, tmp_path / "out", steps=1, log=notes.append)
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    assert any("SHARDED_STATE_DICT" in note and "whole adapter" in note for note in notes)


def _fsdp_keys(path: Path) -> dict:
    written = yaml.safe_load(path.read_text())
    return {k: written[k] for k in ("fsdp", "fsdp_config", "fsdp_version") if written.get(k)}


FSDP_EXAMPLES = sorted(p for p in CORPUS.glob("*.y*ml") if _fsdp_keys(p))


@pytest.mark.parametrize("path", FSDP_EXAMPLES, ids=[p.name for p in FSDP_EXAMPLES])
def test_axolotl_examples_fsdp_keys_run_as_fsdp2(tmp_path, path, fsdp_environment):
    """Every FSDP setting in Axolotl's examples: FSDP2 ones validate as written, FSDP1 ones once
    `fsdp_version: 2` is added (what the refusal says to do), and each says what it asked for
    in Accelerate's plugin."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    from finetune.train.arguments import training_arguments

    keys = _fsdp_keys(path)
    written = {str(k).removeprefix("fsdp_"): v for k, v in (keys.get("fsdp_config") or {}).items()}
    config = config_of(tmp_path, **{**keys, "fsdp_version": 2})
    plugin = FullyShardedDataParallelPlugin(
        **training_arguments(config, tmp_path / "out", steps=1).fsdp_plugin_args
    )
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == bool(
        written.get("offload_params") or "offload" in (keys.get("fsdp") or [])
    )
    assert plugin.cpu_ram_efficient_loading == bool(written.get("cpu_ram_efficient_loading"))
    assert plugin.activation_checkpointing == bool(written.get("activation_checkpointing"))
    if "transformer_layer_cls_to_wrap" in written:
        names = written["transformer_layer_cls_to_wrap"].split(",")  # Jamba names two
        assert plugin.transformer_cls_names_to_wrap == names
    expected_reshard = written.get("reshard_after_forward", True)
    if written.get("sharding_strategy") == "SHARD_GRAD_OP":
        expected_reshard = False
    assert plugin.reshard_after_forward is expected_reshard


@pytest.mark.parametrize(
    "values",
    [
        {"fsdp_config": {"fsdp_version": 2}},  # on, with every default
        {"fsdp_version": 2, "fsdp_config": {}},
        SPELLINGS["version inside"],
        {"fsdp": "full_shard auto_wrap"},  # FSDP1, spelled as one string
    ],
    ids=["version only", "empty config", "version inside", "legacy string"],
)
def test_the_resolved_config_reads_back_the_same(tmp_path, values):
    """config.yaml in the output folder is read again by the later verbs."""
    from finetune.config import render_config

    config = config_of(tmp_path, **values)
    assert config.uses_fsdp()
    again = tmp_path / "again.yaml"
    again.write_text(render_config(config))
    reread = load_config(again).config
    for key in ("fsdp_version", "fsdp_config", "fsdp"):
        assert getattr(reread, key) == getattr(config, key), key


def test_fsdp_config_without_version_is_fsdp1_as_in_axolotl(tmp_path):
    from finetune.machine import fsdp_refusal, machine_warnings

    config = config_of(tmp_path, fsdp_config={"fsdp_offload_params": True})
    assert config.fsdp_version == 1  # the resolved config says what Axolotl would run
    for cuda in (False, True):
        assert "set fsdp_version: 2" in fsdp_refusal(config, cuda=cuda, launched=True)
    assert any("FSDP1" in warning for warning in machine_warnings(config))
    legacy = config_of(tmp_path, fsdp=["full_shard", "auto_wrap"])
    assert legacy.fsdp_version == 1
    assert "set fsdp_version: 2" in fsdp_refusal(legacy, cuda=True, launched=True)


BAD = [
    ({"fsdp_version": 2}, "fsdp_config", "required with fsdp_version"),
    ({"fsdp_version": 3, "fsdp_config": {"offload_params": True}}, "fsdp_version", "1 or 2"),
    (
        {"fsdp_version": 2, "fsdp_config": {"fsdp_version": 1, "offload_params": True}},
        "fsdp_version",
        "keep one",
    ),
    (
        {"fsdp_version": 2, "fsdp_config": {"ofload_params": True}},
        "fsdp_config.ofload_params",
        "did you mean 'offload_params'",
    ),
    (
        {"fsdp_version": 2, "fsdp_config": {"offload_params": "yes"}},
        "fsdp_config.offload_params",
        "true or false",
    ),
    (
        {"fsdp_version": 2, "fsdp_config": {"offload_params": True, "fsdp_offload_params": False}},
        "fsdp_config.fsdp_offload_params",
        "given twice",
    ),
    (
        {"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP"}},
        "fsdp_config.min_num_params",
        "required with auto_wrap_policy: SIZE_BASED_WRAP",
    ),
    (
        {"fsdp_version": 2, "fsdp_config": {"sharding_strategy": "HYBRID_SHARD"}},
        "fsdp_config.sharding_strategy",
        "FSDP1-only",
    ),
    (
        {"fsdp_version": 2, "fsdp_config": {"state_dict_type": "LOCAL_STATE_DICT"}},
        "fsdp_config.state_dict_type",
        "FSDP1-only",
    ),
    (
        {
            "fsdp_version": 2,
            "fsdp_config": {"sharding_strategy": "SHARD_GRAD_OP", "reshard_after_forward": True},
        },
        "fsdp_config.reshard_after_forward",
        "keep one",
    ),
    (
        {"fsdp_version": 2, "fsdp": ["no_shard"], "fsdp_config": {"offload_params": False}},
        "fsdp",
        "FSDP1 sharding strategy",
    ),
    ({"fsdp": ["full_shrad"]}, "fsdp", "did you mean 'full_shard'"),
    (
        {"fsdp_version": 2, "fsdp_config": {"mixed_precision_policy": "bf16"}},
        "fsdp_config.mixed_precision_policy",
        "bf16 / fp16",
    ),
    (
        {
            "fsdp_version": 2,
            "fsdp_config": {"activation_checkpointing": True},
            "gradient_checkpointing": "offload",
        },
        "gradient_checkpointing",
        "keep one",
    ),
    (
        {"fsdp_version": 2, "fsdp_config": {"offload_params": True}, "deepspeed": "zero3"},
        "fsdp",
        "exclusive",
    ),
]


@pytest.mark.parametrize(("values", "key", "words"), BAD, ids=[f"{b[1]}-{b[2]}" for b in BAD])
def test_each_fsdp_problem_names_its_key(tmp_path, values, key, words):
    problems = problems_of(tmp_path, **values)
    assert key in problems, problems
    assert words in problems[key], problems


def test_fsdp_activation_checkpointing_replaces_ours(tmp_path, tiny_model_dir):
    """Both set (as Axolotl's FSDP examples do): FSDP2 checkpoints the layers, once."""
    from transformers import AutoModelForCausalLM

    from finetune.model.load import enable_gradient_checkpointing

    for fsdp, expected in (({}, True), ({"activation_checkpointing": True}, False)):
        values = {"fsdp_version": 2, "fsdp_config": fsdp} if fsdp else {}
        config = config_of(tmp_path, gradient_checkpointing=True, **values)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        enable_gradient_checkpointing(model, config)
        assert model.is_activation_checkpointing is expected


# --------------------------------------------------------------------- the refusals


def test_refused_on_gpus_without_a_launcher(tmp_path):
    """The HF Trainer refuses FSDP in a process no launcher started; said before anything
    loads. Under torchrun / accelerate launch even one GPU is fine (offload_params)."""
    from finetune.machine import fsdp_refusal

    config = config_of(tmp_path, fsdp_version=2, fsdp_config={"offload_params": True})
    assert "--num-processes" in fsdp_refusal(config, cuda=True, launched=False)
    assert fsdp_refusal(config, cuda=True, launched=True) is None
    assert fsdp_refusal(config, cuda=True) is None  # validate: how it is launched is unknown


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_train_refuses_fsdp2_on_cpu_before_loading(tmp_path, tiny_model_dir, capsys):
    from finetune.cli import main

    path = tmp_path / "config.yaml"
    values = {
        **MINIMAL,
        "base_model": str(tiny_model_dir),
        "fsdp_version": 2,
        "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
    }
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(SystemExit) as exited:
        main(["validate", str(path)])
    assert exited.value.code in (0, None)
    said = capsys.readouterr()
    assert "note (this machine): fsdp_version: 2 needs CUDA GPUs" in said.out + said.err
    with pytest.raises(SystemExit) as exited:
        main(["train", str(path)])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "fsdp_version: 2 needs CUDA GPUs" in message and "deepspeed: zero3" in message
    assert len(message.splitlines()) <= 2 and "Traceback" not in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists()


def test_the_cpu_refusal_is_a_training_error(tmp_path):
    from finetune.machine import check_combinations_for_machine, fsdp_refusal

    config = config_of(tmp_path, fsdp_version=2, fsdp_config={"offload_params": False})
    assert "needs CUDA GPUs" in fsdp_refusal(config, cuda=False, launched=True)
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="needs CUDA GPUs"):
            check_combinations_for_machine(config)


# ------------------------------------------------ our adapters under torch's FSDP2 on CPU

ENGINE = """
import json, sys
from pathlib import Path

import torch

from finetune.config import load_config
from finetune.model.adapters import attach_adapter
from finetune.model.load import load_model, load_tokenizer
from finetune.train.loss import kept_token_loss

output, *configs = sys.argv[1:]
fsdp = "RANK" in __import__("os").environ
rank, world = 0, 1
if fsdp:
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.other import get_module_children_bottom_up
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from finetune.train.arguments import training_arguments

    # As `finetune train` does: TrainingArguments first (they join the process group). Once:
    # the configs share their FSDP keys, and new TrainingArguments would reset the group.
    args = training_arguments(load_config(configs[0]).config, Path(output), steps=1)
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
for path in configs:
    config = load_config(path).config
    name = Path(path).stem
    # The model `train` builds; without fsdp keys only because load_model refuses FSDP on CPU
    # (in fp32 nothing in it depends on them).
    plain = config.model_copy(update={"fsdp": None, "fsdp_config": None, "fsdp_version": None})
    torch.manual_seed(0)
    model = load_model(plain, load_tokenizer(plain))
    model = attach_adapter(model, config, log=lambda message: None).train()
    if fsdp:
        # Accelerate's own choice of FSDP units (fsdp2_prepare_model without the Accelerator,
        # which on CPU has no FSDP plugin), then the root.
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        for module in get_module_children_bottom_up(model)[:-1]:
            if policy(module):
                fully_shard(module, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward)
        fully_shard(model, mesh=mesh)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    vocabulary = model.get_input_embeddings().weight.shape[0]
    for step in range(3):
        ids = torch.randint(0, vocabulary, (4, 24), generator=generator)
        labels = ids.clone()
        labels[:, : 6 + step] = -100  # a prompt, trained on no token
        mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
        total = int((labels[:, 1:] != -100).sum())
        loss, _, _ = kept_token_loss(
            model, {"input_ids": ids[mine], "labels": labels[mine]}, num_items_in_batch=total
        )
        # FSDP averages gradients over processes; the Trainer scales the loss by their number.
        (loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()
    if fsdp:
        # What Trainer.save_model does under FSDP2: Accelerator.get_state_dict, then PEFT.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True
        )
        state = get_model_state_dict(model, options=options)
        shards = {
            n: [p.to_local().numel(), p.numel()]
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        if rank == 0:
            model.save_pretrained(str(Path(output) / name), state_dict=state)
        Path(output).mkdir(exist_ok=True)
        (Path(output) / f"{name}-shards-{rank}.json").write_text(json.dumps(shards))
    else:
        model.save_pretrained(str(Path(output) / name))
"""

ADAPTERS = {
    "lora": {"adapter": "lora"},
    "dora": {"adapter": "lora", "peft_use_dora": True},
    "qlora": {"adapter": "qlora", "load_in_4bit": True},
}


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, tiny_model_dir):
    """LoRA, DoRA and QLoRA trained by two FSDP2 processes, and by one process without FSDP."""
    folder = tmp_path_factory.mktemp("fsdp-engine")
    script = folder / "engine.py"
    script.write_text(ENGINE)
    configs = []
    for name, adapter in ADAPTERS.items():
        path = folder / f"{name}.yaml"
        values = {
            **MINIMAL,
            **adapter,
            "base_model": str(tiny_model_dir),
            "lora_target_linear": True,
            "bf16": False,
            "fsdp_version": 2,
            "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
        }
        path.write_text(yaml.safe_dump(values))
        configs.append(str(path))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for output, launcher in (
        (folder / "plain", [sys.executable]),
        (
            folder / "fsdp",
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            + ["--master_port", str(free_port())],
        ),
    ):
        result = subprocess.run(
            [*launcher, str(script), str(output), *configs],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_two_fsdp2_processes_train_the_one_process_adapter(engine_runs, adapter):
    """Sharded over two CPU processes by FSDP2, gathered whole, saved by PEFT: the adapter one
    process trains without FSDP, to 1e-4 (DoRA's magnitudes and QLoRA's 4-bit weights stored in
    the compute dtype included)."""
    import json

    reference = load_file(engine_runs / "plain" / adapter / "adapter_model.safetensors")
    trained = load_file(engine_runs / "fsdp" / adapter / "adapter_model.safetensors")
    assert trained.keys() == reference.keys()
    if adapter == "dora":
        assert any("lora_magnitude_vector" in key for key in trained)
    for key, tensor in reference.items():
        torch.testing.assert_close(trained[key], tensor, rtol=0, atol=1e-4)
    assert all(trained[k].abs().max() > 0 for k in trained if "lora_B" in k)  # B started at 0
    # Each process held half of every sharded trained tensor (dim 0 split in two).
    shards = [
        json.loads((engine_runs / "fsdp" / f"{adapter}-shards-{rank}.json").read_text())
        for rank in (0, 1)
    ]
    layers = [name for name in shards[0] if ".layers." in name]
    assert layers
    for name in layers:
        (mine, whole), (theirs, _) = shards[0][name], shards[1][name]
        assert mine + theirs == whole and 0 < mine < whole, (name, mine, theirs, whole)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_the_gathered_adapter_loads_in_peft_and_merges(
    engine_runs, adapter, tiny_model_dir, tmp_path
):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from finetune.merge import merge_adapter

    folder = engine_runs / "fsdp" / adapter
    saved = load_file(folder / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
    # `finetune merge`'s own function, with its check that the merged model computes what
    # base + adapter compute.
    report = merge_adapter(
        tiny_model_dir, folder, tmp_path / "merged", verify=True, log=lambda message: None
    )
    assert report.tensors_merged > 0 and report.max_abs_logit_diff is not None
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
