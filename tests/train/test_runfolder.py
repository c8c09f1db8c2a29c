"""The run folder is the contract: no stale state survives --force, a finished run is never
resumed into, a checkpoint of another run is never resumed, and merge / inference act on what
the run recorded, not on a YAML edited since."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from finetune.config import FinetuneConfig, load_config
from finetune.errors import TrainingError
from finetune.runfolder import read_record, run_config
from finetune.train import train
from finetune.train.checkpoints import complete_checkpoints

SAMPLES = Path(__file__).parents[2] / "data" / "samples"
QUIET = {"log": lambda message: None}


def make_config(tmp_path: Path, model_dir: Path, **options) -> FinetuneConfig:
    values = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(SAMPLES / "alpaca.jsonl"), "type": "alpaca"}],
        "adapter": "lora",
        "lora_target_linear": True,
        "micro_batch_size": 2,
        "max_steps": 4,
        "save_steps": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
        **options,
    }
    return FinetuneConfig(**values)


class InterruptAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_force_leaves_nothing_of_the_previous_run(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir)
    train(config, **QUIET)
    output = Path(config.output_dir)
    first = read_record(output).run_id
    (output / "merged").mkdir()
    (output / "merged" / "model.safetensors").write_text("the old run's merged model")
    (output / "interrupted").mkdir()
    shutil.copytree(output / "checkpoint-4", output / "checkpoint-40")  # an old, later one

    lines = []
    train(make_config(tmp_path, tiny_model_dir, max_steps=2), force=True, log=lines.append)
    assert not (output / "merged").exists()
    assert not (output / "interrupted").exists()
    assert [c.name for c in complete_checkpoints(output)] == ["checkpoint-2"]
    assert read_record(output).run_id != first
    assert any(line.startswith("--force: the previous run in") for line in lines)
    assert [p.name for p in output.parent.iterdir() if ".previous-" in p.name] == []


def test_auto_resume_never_overwrites_a_finished_run(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir)
    train(config, **QUIET)
    again = config.model_copy(update={"auto_resume_from_checkpoints": True})
    with pytest.raises(TrainingError, match="already holds a finished run"):
        train(again, **QUIET)
    with pytest.raises(TrainingError, match="already holds a finished run"):
        train(config, resume=True, **QUIET)


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, max_steps=6)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[InterruptAt(3)], **QUIET)
    output = Path(config.output_dir)
    record = json.loads((output / "run.json").read_text())
    record["run_id"] = "someone-elses-run"
    (output / "run.json").write_text(json.dumps(record))
    with pytest.raises(TrainingError, match="belongs to another run"):
        train(config, resume=True, **QUIET)


def test_a_resumed_run_says_where_it_continues_from(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, max_steps=6)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[InterruptAt(3)], **QUIET)
    lines = []
    train(config, resume=True, log=lines.append)
    output = Path(config.output_dir)
    assert lines[0] == f"resuming from {output / 'checkpoint-3'} (step 3)"
    assert read_record(output).finished


def test_later_verbs_read_the_run_record_not_an_edited_yaml(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, max_steps=1, bf16="auto")
    train(config, **QUIET)
    record = read_record(Path(config.output_dir))
    assert record.config["bf16"] in (True, False)  # auto was decided, in the library
    assert record.compute_dtype in ("bf16", "fp32")
    assert record.base_model_folder == str(tiny_model_dir)

    # The YAML is edited after training; merge and inference must still see the trained run.
    edited = {**config.model_dump(mode="json"), "base_model": "someone/another-model", "lora_r": 64}
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(edited))
    loaded = load_config(path)
    assert run_config(loaded).base_model == str(tiny_model_dir)
    assert run_config(loaded).lora_r == config.lora_r
    # ... but a key given on the command line wins.
    loaded = load_config(path, ["--trust-remote-code"])
    assert run_config(loaded).trust_remote_code is True
