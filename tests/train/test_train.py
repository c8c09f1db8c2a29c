"""Training on a tiny in-process model: every adapter kind, the loss contract, the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from finetune.config import FinetuneConfig, load_config
from finetune.errors import TrainingError
from finetune.train import train

SAMPLES = Path(__file__).parents[2] / "data" / "samples"
QUIET = {"log": lambda message: None}
MIXED = [
    {"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"},
    {"path": str(SAMPLES / "qa.jsonl"), "type": "alpaca_chat.load_qa"},
    {"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"},
]  # 8 rows of different formats and lengths


def make_config(tmp_path: Path, model_dir: Path, **options) -> FinetuneConfig:
    values = {
        "base_model": str(model_dir),
        "datasets": MIXED,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_linear": True,
        "micro_batch_size": 2,
        "max_steps": 20,
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_steps": 1000,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
    }
    values.update(options)
    return FinetuneConfig(**values)


def metrics(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(output_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(output_dir) if "loss" in m]


def initial_adapter(config: FinetuneConfig):
    """The adapter as training starts it: same seed, same loading path."""
    from transformers import set_seed

    from finetune.model.adapters import attach_adapter
    from finetune.model.load import load_model, load_tokenizer

    set_seed(config.seed)
    tokenizer = load_tokenizer(config)
    model = attach_adapter(load_model(config, tokenizer), config, **QUIET)
    return {
        name: param.detach().clone().float()
        for name, param in model.named_parameters()
        if "lora_" in name
    }


ADAPTER_KINDS = {
    "lora": {},
    "qlora": {"adapter": "qlora", "load_in_4bit": True},
    "lora_8bit": {"load_in_8bit": True},
    "dora": {"peft_use_dora": True},
    "rslora": {"peft_use_rslora": True},
}


@pytest.mark.parametrize("kind", list(ADAPTER_KINDS))
def test_each_adapter_kind_trains(tmp_path, tiny_model_dir, kind):
    config = make_config(tmp_path, tiny_model_dir, **ADAPTER_KINDS[kind])
    before = initial_adapter(config)
    result = train(config, **QUIET)

    after = {
        name: param.detach().float()
        for name, param in result.model.named_parameters()
        if "lora_" in name
    }
    assert before.keys() == after.keys() and before
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == [], f"adapter tensors that did not train: {unchanged}"
    assert not [
        n for n, p in result.model.named_parameters() if p.requires_grad and "lora_" not in n
    ]

    base = dict(result.model.get_base_model().named_parameters())
    for name, tensor in initial_adapter_base(config).items():
        # Compare bytes: 4-bit weights are packed into float storage, where NaN != NaN.
        trained = base[name].detach().cpu().contiguous()
        assert torch.equal(trained.view(torch.uint8), tensor.contiguous().view(torch.uint8)), name

    trace = losses(result.output_dir)
    assert len(trace) == 20
    assert sum(trace[-3:]) / 3 < sum(trace[:3]) / 3 - 0.05, trace


def initial_adapter_base(config: FinetuneConfig) -> dict[str, torch.Tensor]:
    """The base (frozen) weights of a fresh load, to check training left them alone."""
    from finetune.model.load import load_model, load_tokenizer

    model = load_model(config, load_tokenizer(config))
    return {
        name.replace(".weight", ".base_layer.weight")
        if any(t in name for t in ("proj.weight",))
        else name: param.detach().cpu().clone()
        for name, param in model.named_parameters()
        if "layers.0." in name
    }


def test_output_folder_contract(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, tiny_model_dir, max_steps=4, chat_template="chatml")
    output = train(config, **QUIET).output_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
    ):
        assert (output / name).is_file(), name
    assert not list(output.glob("*.bin"))
    records = metrics(output)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"} <= set(
        records[0]
    )
    reloaded = load_config(output / "config.yaml").config  # the resolved config validates
    assert reloaded.lora_r == config.lora_r
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), output
    )
    saved = load_file(output / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)
    assert adapter.peft_config["default"].r == 8
    from transformers import AutoTokenizer

    assert "<|im_start|>" in AutoTokenizer.from_pretrained(output).chat_template


def first_loss(tmp_path: Path, model_dir: Path, name: str, **options) -> float:
    config = make_config(
        tmp_path / name, model_dir, max_steps=1, learning_rate=0.0, sequence_len=1024, **options
    )
    train(config, **QUIET)
    return losses(Path(config.output_dir))[0]


def test_packed_and_padded_first_loss_agree(tmp_path, tiny_model_dir):
    padded = first_loss(tmp_path, tiny_model_dir, "padded", micro_batch_size=8)
    packed = first_loss(tmp_path, tiny_model_dir, "packed", micro_batch_size=1, sample_packing=True)
    assert abs(packed - padded) <= 1e-4, (packed, padded)


def test_gradient_accumulation_gives_the_same_loss(tmp_path, tiny_model_dir):
    whole = first_loss(tmp_path, tiny_model_dir, "whole", micro_batch_size=8)
    accumulated = first_loss(
        tmp_path, tiny_model_dir, "accumulated", micro_batch_size=2, gradient_accumulation_steps=4
    )
    assert abs(accumulated - whole) <= 1e-4, (accumulated, whole)


class InterruptAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, tiny_model_dir):
    options = {"max_steps": 8, "save_steps": 3, "lora_dropout": 0.1}
    straight = make_config(tmp_path / "straight", tiny_model_dir, **options)
    train(straight, **QUIET)

    resumed = make_config(tmp_path / "resumed", tiny_model_dir, **options)
    with pytest.raises(KeyboardInterrupt):
        train(resumed, callbacks=[InterruptAt(5)], **QUIET)
    output = Path(resumed.output_dir)
    assert (output / "checkpoint-5" / "trainer_state.json").is_file()  # saved on Ctrl-C
    with pytest.raises(TrainingError, match="unfinished run; continue it with --resume"):
        train(resumed, **QUIET)
    train(resumed, resume=True, **QUIET)

    a = load_file(Path(straight.output_dir) / "adapter_model.safetensors")
    b = load_file(output / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert [m["step"] for m in metrics(output) if "loss" in m][-1] == 8


def test_finished_run_is_not_overwritten_without_force(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, max_steps=1)
    train(config, **QUIET)
    with pytest.raises(TrainingError, match="already holds a finished run; pass --force"):
        train(config, **QUIET)
    train(config, force=True, **QUIET)


class PoisonAdapterAt(TrainerCallback):
    """Turns the adapter's weights to NaN after a step, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.fill_(float("nan"))


def test_nan_loss_stops_at_that_step_and_keeps_the_checkpoint(tmp_path, tiny_model_dir):
    from finetune.errors import LossNotFinite

    config = make_config(tmp_path, tiny_model_dir, max_steps=8, save_steps=2)
    with pytest.raises(LossNotFinite, match=r"the loss became nan at step 4 "):
        train(config, callbacks=[PoisonAdapterAt(3)], **QUIET)
    output = Path(config.output_dir)
    assert (output / "checkpoint-2" / "trainer_state.json").is_file()
    good = load_file(output / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())


def test_evaluation_packing_efficiency_and_trained_tokens_are_logged(tmp_path, tiny_model_dir):
    from finetune.data.prepare import prepare_datasets
    from finetune.model.load import load_tokenizer

    datasets = [{"path": str(SAMPLES / "quickstart_facts.jsonl"), "type": "chat_template"}]
    config = make_config(
        tmp_path,
        tiny_model_dir,
        datasets=datasets,
        val_set_size=0.1,
        evals_per_epoch=2,
        sample_packing=True,
        sequence_len=256,
        max_steps=None,
        num_epochs=1,
    )
    result = train(config, **QUIET)
    records = metrics(result.output_dir)
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) >= 2 and all(r["eval_loss"] > 0 for r in evals)
    assert 0.8 < records[0]["packing_efficiency"] <= 1.0
    # One epoch: the logged counts add up to the trained labels of the training split.
    train_split = prepare_datasets(config, load_tokenizer(config), log=lambda _: None).train
    trained = sum(sum(label != -100 for label in labels) for labels in train_split["labels"])
    assert sum(r.get("trained_tokens", 0) for r in records) == trained > 0


def test_disk_full_while_saving_names_the_last_good_checkpoint(
    tmp_path, tiny_model_dir, monkeypatch
):
    import errno

    real_save = torch.save

    def fill_disk_on_second_checkpoint(obj, target, *args, **kwargs):
        # The disk fills up while the Trainer writes checkpoint-4's optimizer state.
        if "checkpoint-4" in str(target):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_disk_on_second_checkpoint)
    config = make_config(tmp_path, tiny_model_dir, max_steps=6, save_steps=2)
    with pytest.raises(
        TrainingError, match=r"disk full .*\(last complete checkpoint: checkpoint-2\)"
    ):
        train(config, **QUIET)
    good = Path(config.output_dir) / "checkpoint-2"
    assert load_file(good / "adapter_model.safetensors")
