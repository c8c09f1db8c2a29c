"""TrainingArguments from the config, and the reporters (TensorBoard, W&B, MLflow) it names."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from finetune.config import FinetuneConfig
from finetune.errors import TrainingError


def training_arguments(
    config: FinetuneConfig, output_dir: Path, steps: int, has_eval: bool = False
) -> TrainingArguments:
    """TrainingArguments from the config; `steps` (per epoch) turns per-epoch counts into steps."""
    report_to = reporters(config)
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


def reporters(config: FinetuneConfig) -> list[str]:
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


def check_reporter_packages(config: FinetuneConfig) -> None:
    """A reporter whose package is missing fails now, not after the data and model loaded."""
    import importlib.util

    for key, package in (
        ("use_tensorboard", "tensorboard"),
        ("wandb_project", "wandb"),
        ("mlflow_tracking_uri", "mlflow"),
    ):
        if getattr(config, key) and importlib.util.find_spec(package) is None:
            raise TrainingError(f"{key} needs the {package} package: pip install {package}")
