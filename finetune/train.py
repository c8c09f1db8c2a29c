"""`finetune train`: prepared data + base model + adapter -> HF Trainer -> output_dir.

The output folder (DESIGN.md): adapter_config.json + adapter_model.safetensors, the tokenizer
with the run's chat template, the resolved config.yaml, metrics.jsonl, loss.png, and
checkpoint-N/ folders while training.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from finetune.config import FinetuneConfig
from finetune.data.packing import BatchPlan, collate_packed, collate_padded, steps_per_epoch
from finetune.errors import FinetuneError
from finetune.loss import kept_token_loss

FINAL_ADAPTER = "adapter_model.safetensors"


class TrainingError(FinetuneError):
    """Training cannot start or cannot go on."""


class LossNotFinite(TrainingError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float | None
    model: torch.nn.Module


class PlanDataLoader(DataLoader):
    """A DataLoader over a BatchPlan that the Trainer can tell which epoch it is."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class FinetuneTrainer(Trainer):
    """The HF Trainer with our batches (packed or padded) and our loss (kept tokens only)."""

    def __init__(
        self,
        *args,
        train_plan: BatchPlan,
        eval_plan: BatchPlan | None,
        collate,
        eval_collate,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.train_plan, self.eval_plan = train_plan, eval_plan
        self.collate, self.eval_collate = collate, eval_collate
        # Our loss takes keyword arguments, so the Trainer always counts the step's tokens.
        self.model_accepts_loss_kwargs = True
        self._tokens_since_log = 0
        self._last_log_time = time.perf_counter()
        self._first_loss: float | None = None
        self._warned_explosion = False
        self.say: Callable[[str], None] = print

    def get_train_dataloader(self) -> DataLoader:
        # The plan already gives this rank its own batches, so the loader is not re-sharded.
        return PlanDataLoader(
            self.train_dataset, batch_sampler=self.train_plan, collate_fn=self.collate
        )

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        return PlanDataLoader(
            eval_dataset or self.eval_dataset,
            batch_sampler=self.eval_plan,
            collate_fn=self.eval_collate,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs, count = kept_token_loss(model, inputs, num_items_in_batch)
        # Normalized by the token count of the whole optimizer step (all ranks), the loss needs
        # no further division by gradient_accumulation_steps.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        if model.training:
            self._tokens_since_log += int(count)
            if not torch.isfinite(loss.detach()):
                raise LossNotFinite(
                    f"the loss became {loss.item()} at step {self.state.global_step + 1} "
                    f"(learning_rate {self._get_learning_rate():.3g}); lower learning_rate or "
                    "check the data. Checkpoints saved so far are kept."
                )
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            tokens = self._tokens_since_log * self.accelerator.num_processes
            logs["trained_tokens"] = tokens  # since the last log, all processes
            logs["tokens_per_second"] = round(tokens / max(now - self._last_log_time, 1e-9), 1)
            self._tokens_since_log, self._last_log_time = 0, now
            if self._first_loss is None:
                self._first_loss = logs["loss"]
                if self.train_plan.efficiency is not None:
                    logs["packing_efficiency"] = round(self.train_plan.efficiency, 4)
            elif logs["loss"] > 3 * self._first_loss and not self._warned_explosion:
                self._warned_explosion = True
                self.say(
                    f"warning: the loss exploded from {self._first_loss:.3g} to "
                    f"{logs['loss']:.3g} at step {self.state.global_step}; learning_rate "
                    f"{self.args.learning_rate:g} is probably too high"
                )
        super().log(logs, start_time)


class MetricsFile(TrainerCallback):
    """metrics.jsonl: one JSON object per logged step (main process only)."""

    KEYS = (
        "loss",
        "learning_rate",
        "grad_norm",
        "trained_tokens",
        "tokens_per_second",
        "eval_loss",
        "packing_efficiency",
    )

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        record.update({k: _plain(logs[k]) for k in self.KEYS if k in logs})
        if len(record) > 2:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def train(
    config: FinetuneConfig,
    *,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Train the adapter described by `config`; returns where it was written."""
    from finetune.attention import register_attention
    from finetune.data.prepare import format_summary, prepare_datasets
    from finetune.hardware import keep_freed_memory_for_reuse
    from finetune.model import (
        check_base_model,
        check_combinations_for_machine,
        load_model,
        load_tokenizer,
    )

    if int(os.environ.get("RANK", "0")) != 0:
        log = _silent  # one process speaks for all
    check_combinations_for_machine(config)
    check_base_model(config)
    _check_reporter_packages(config)
    output_dir = Path(config.output_dir)
    checkpoint = _checkpoint_to_resume(config, output_dir, resume, force)
    _set_rendezvous_for_single_process(config)

    tokenizer = load_tokenizer(config)
    prepared = prepare_datasets(config, tokenizer, log=log)
    log(format_summary(prepared.summary))
    if prepared.chat_template:
        tokenizer.chat_template = prepared.chat_template

    keep_freed_memory_for_reuse()  # CPU: no page faults for each step's activations
    set_seed(config.seed)  # the adapter's initial weights too come from the seed
    attention = config.attn_implementation
    if config.sample_packing and attention == "sdpa":
        attention = register_attention()  # per-sample SDPA: packing's speed-up on any device
    model = load_model(config, tokenizer, attn_implementation=attention)
    if config.adapter:
        from finetune.adapters import attach_adapter

        model = attach_adapter(model, config, log=log)

    args = _training_arguments(config, output_dir, steps=1)  # sets up the distributed state
    train_plan, eval_plan = _batch_plans(config, prepared, args.process_index, args.world_size)
    steps = steps_per_epoch(train_plan, config.gradient_accumulation_steps)
    args = _training_arguments(config, output_dir, steps=steps, has_eval=eval_plan is not None)
    if train_plan.efficiency is not None:
        log(
            f"packing: {len(train_plan.groups)} rows of {config.sequence_len} tokens, "
            f"efficiency {train_plan.efficiency:.3f} (real tokens / token slots)"
        )
    log(f"{steps} optimizer steps per epoch, {args.world_size} process(es)")

    callbacks = list(callbacks or [])
    if args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        _start_metrics_log(output_dir / "metrics.jsonl", checkpoint)
        callbacks.append(MetricsFile(output_dir / "metrics.jsonl"))
    if config.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))

    trainer = FinetuneTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
        train_plan=train_plan,
        eval_plan=eval_plan,
        collate=_collator(config, tokenizer.pad_token_id, config.sample_packing),
        eval_collate=_collator(config, tokenizer.pad_token_id, config.eval_sample_packing),
    )
    trainer.say = log
    try:
        with _sigterm_as_interrupt():
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        _save_on_interrupt(trainer, output_dir, log)
        raise
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        kept = complete_checkpoints(output_dir)
        raise TrainingError(
            f"disk full while writing to {output_dir} at step {trainer.state.global_step}; "
            f"free some space and continue with --resume (last complete checkpoint: "
            f"{kept[-1].name if kept else 'none'})"
        ) from None
    _save_final(trainer, output_dir)
    if trainer.is_world_process_zero():
        _write_outputs(tokenizer, config, output_dir)
    return TrainResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        final_loss=output.training_loss,
        model=trainer.model,
    )


def _batch_plans(config: FinetuneConfig, prepared, rank: int, world: int):
    """This rank's training batches and (when there is eval data) eval batches."""
    train_plan = BatchPlan(
        prepared.train["length"],
        config.micro_batch_size,
        config.sequence_len,
        packed=config.sample_packing,
        seed=config.seed,
        rank=rank,
        world_size=world,
    )
    eval_plan = None
    if prepared.eval is not None:
        eval_plan = BatchPlan(
            prepared.eval["length"],
            config.eval_batch_size or config.micro_batch_size,
            config.sequence_len,
            packed=config.eval_sample_packing,
            seed=config.seed,
            shuffle=False,
            rank=rank,
            world_size=world,
        )
    return train_plan, eval_plan


def _collator(config: FinetuneConfig, pad_id: int, packed: bool) -> Callable:
    """Samples -> one packed row, or a padded batch (to `sequence_len` with pad_to_sequence_len)."""
    pad_to = config.sequence_len if config.pad_to_sequence_len else None
    if packed:
        width = pad_to * config.micro_batch_size if pad_to else None
        return lambda samples: collate_packed(samples, pad_id, width)
    return lambda samples: collate_padded(samples, pad_id, pad_to)


def _silent(message: str) -> None:
    pass


def _training_arguments(
    config: FinetuneConfig, output_dir: Path, steps: int, has_eval: bool = False
) -> TrainingArguments:
    """TrainingArguments from the config; `steps` (per epoch) turns per-epoch counts into steps."""
    report_to = _reporters(config)
    eval_strategy, eval_steps = "no", None
    if has_eval:
        eval_strategy, eval_steps = _every(config.eval_steps, config.evals_per_epoch, steps)
    save_strategy, save_steps = _every(config.save_steps, config.saves_per_epoch, steps)
    best_model = {}
    if config.early_stopping_patience and has_eval:
        save_strategy, save_steps = eval_strategy, eval_steps
        best_model = {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss"}
    warmup = config.warmup_steps if config.warmup_steps is not None else (config.warmup_ratio or 0)
    optional = {
        name: value
        for name, value in (
            ("adam_beta1", config.adam_beta1),
            ("adam_beta2", config.adam_beta2),
            ("adam_epsilon", config.adam_epsilon),
            ("ddp_timeout", config.ddp_timeout),
            ("ddp_find_unused_parameters", config.ddp_find_unused_parameters),
            ("lr_scheduler_kwargs", config.lr_scheduler_kwargs),
            ("run_name", config.wandb_name or config.mlflow_run_name),
        )
        if value is not None
    }
    cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=config.optimizer,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16 is True,
        fp16=config.fp16,
        tf32=config.tf32 if not cpu else None,
        use_cpu=cpu,
        logging_steps=config.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=config.save_total_limit,
        report_to=report_to,
        deepspeed=config.deepspeed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **best_model,
        **optional,
    )


def _every(steps: int | float | None, per_epoch: int | None, steps_per_epoch: int):
    """(strategy, steps) for `*_steps` / `*s_per_epoch`; once per epoch by default."""
    if steps is not None:
        return "steps", steps
    if per_epoch is not None:
        return "steps", max(1, math.floor(steps_per_epoch / per_epoch))
    return "epoch", None


def _reporters(config: FinetuneConfig) -> list[str]:
    """The Trainer's own reporters, switched on only by their config keys (no telemetry)."""
    report = []
    if config.use_tensorboard:
        report.append("tensorboard")
    if config.wandb_project:
        os.environ["WANDB_PROJECT"] = config.wandb_project
        for key, env in (
            ("wandb_entity", "WANDB_ENTITY"),
            ("wandb_mode", "WANDB_MODE"),
            ("wandb_run_id", "WANDB_RUN_ID"),
        ):
            if getattr(config, key):
                os.environ[env] = getattr(config, key)
        report.append("wandb")
    if config.mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = config.mlflow_tracking_uri
        if config.mlflow_experiment_name:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = config.mlflow_experiment_name
        report.append("mlflow")
    return report or ["none"]


def _check_reporter_packages(config: FinetuneConfig) -> None:
    """A reporter whose package is missing fails now, not after the data and model loaded."""
    import importlib.util

    for key, package in (
        ("use_tensorboard", "tensorboard"),
        ("wandb_project", "wandb"),
        ("mlflow_tracking_uri", "mlflow"),
    ):
        if getattr(config, key) and importlib.util.find_spec(package) is None:
            raise TrainingError(f"{key} needs the {package} package: pip install {package}")


def _set_rendezvous_for_single_process(config: FinetuneConfig) -> None:
    """DeepSpeed wants a process group even alone; without a launcher, make a one-process one
    (else it asks for mpi4py)."""
    if not config.deepspeed or "RANK" in os.environ:
        return
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders that were written to the end, oldest first.

    The Trainer writes trainer_state.json last, so a folder without a readable one was cut off
    while being written and must never be loaded.
    """
    found = []
    for folder in output_dir.glob("checkpoint-*"):
        suffix = folder.name.rsplit("-", 1)[-1]
        if not suffix.isdigit():
            continue
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append((int(suffix), folder))
    return [folder for _, folder in sorted(found)]


def _checkpoint_to_resume(
    config: FinetuneConfig, output_dir: Path, resume: bool, force: bool
) -> Path | None:
    if config.resume_from_checkpoint:
        path = Path(config.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise TrainingError(
                f"resume_from_checkpoint: {path} is not a complete checkpoint folder"
            )
        return path
    checkpoints = complete_checkpoints(output_dir) if output_dir.is_dir() else []
    if resume or config.auto_resume_from_checkpoints:
        if checkpoints:
            return checkpoints[-1]
        if resume:
            raise TrainingError(f"--resume: {output_dir} has no complete checkpoint to resume from")
        return None
    if force:
        return None
    if (output_dir / FINAL_ADAPTER).is_file():
        raise TrainingError(
            f"output_dir: {output_dir} already holds a finished run; pass --force to overwrite it, "
            "or set another output_dir"
        )
    if checkpoints:
        raise TrainingError(
            f"output_dir: {output_dir} holds checkpoints of an unfinished run; continue it with "
            "--resume, or pass --force to start over"
        )
    return None


def _start_metrics_log(path: Path, checkpoint: Path | None) -> None:
    """A fresh run starts a fresh log; a resumed one keeps the records up to its checkpoint, so
    the steps replayed after it are not logged twice."""
    if checkpoint is None or not path.is_file():
        path.unlink(missing_ok=True)
        return
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) saves and exits like Ctrl-C does."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _save_final(trainer: FinetuneTrainer, output_dir: Path) -> None:
    """Save the adapter next to the output, then move its files in; the weights file, the mark
    of a finished run, arrives last, so an interrupted save never looks finished."""
    staging = output_dir / ".final-tmp"
    trainer.save_model(str(staging))  # every rank: ZeRO-3 gathers the weights to save
    if not trainer.is_world_process_zero():
        return
    files = sorted(staging.iterdir(), key=lambda p: p.name == FINAL_ADAPTER)
    for file in files:
        os.replace(file, output_dir / file.name)
    staging.rmdir()


def _save_on_interrupt(trainer: FinetuneTrainer, output_dir: Path, log) -> None:
    """Ctrl-C: keep the work done so far as a resumable checkpoint and the adapter."""
    if trainer.state.global_step == 0:
        return
    # Trainer._save_checkpoint is private, but it is the one way to write a checkpoint the
    # Trainer itself can resume from (transformers 5.24).
    trainer._save_checkpoint(trainer.model, trial=None)
    if trainer.is_world_process_zero():
        trainer.save_model(str(output_dir / "interrupted"))
    log(
        f"interrupted at step {trainer.state.global_step}: checkpoint saved in {output_dir}; "
        "continue with `finetune train CONFIG --resume`"
    )


def _write_outputs(tokenizer, config: FinetuneConfig, output_dir: Path) -> None:
    from finetune.configfile import render_config

    # The Trainer pickles its arguments next to the model; the output keeps to safetensors/JSON.
    (output_dir / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / "config.yaml").write_text(render_config(config))
    plot_losses(output_dir / "metrics.jsonl", output_dir / "loss.png")


def plot_losses(metrics: Path, image: Path) -> None:
    """loss.png: train loss (and eval loss when evaluated) per step."""
    if not metrics.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axis.plot(
                *zip(*points, strict=True), marker="." if len(points) < 50 else None, label=label
            )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(image, dpi=100)
    plt.close(figure)
