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
    config: FinetuneConfig,
    output_dir: Path,
    steps: int,
    has_eval: bool = False,
    log=lambda message: None,
) -> TrainingArguments:
    """TrainingArguments from the config; `steps` (per epoch) turns per-epoch counts and
    Axolotl's warm-up default into steps."""
    report_to = reporters(config)
    schedule = evaluation_and_saving(config, steps, has_eval, log)
    optimizer_steps = total_steps(config, steps)
    optional = {
        name: value
        for name, value in (
            ("adam_beta1", config.adam_beta1),
            ("adam_beta2", config.adam_beta2),
            ("adam_epsilon", config.adam_epsilon),
            ("ddp_timeout", config.ddp_timeout),
            ("ddp_find_unused_parameters", config.ddp_find_unused_parameters),
            ("run_name", config.run_name()),
        )
        if value is not None
    }
    cpu = not torch.cuda.is_available()
    return TrainingArguments(
        **fsdp_arguments(config, log),
        output_dir=str(output_dir),
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        **learning_rate_schedule(config),
        warmup_steps=warmup_steps(config, optimizer_steps),
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
        **schedule,
        save_total_limit=config.save_total_limit,
        report_to=report_to,
        deepspeed=config.deepspeed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **optional,
    )


def fsdp_arguments(config: FinetuneConfig, log=lambda message: None) -> dict:
    """TrainingArguments' `fsdp` and `fsdp_config` for FSDP2 (none without FSDP).

    transformers 5.24 turns `fsdp_config` into Accelerate's FullyShardedDataParallelPlugin
    (`TrainingArguments._process_fsdp_args`); Axolotl's names map onto its keys: offload_params
    is `cpu_offload`, the legacy `fsdp: [...]` list and FSDP1's sharding_strategy become
    `reshard_after_forward`. The adapter is always saved whole (FULL_STATE_DICT: LoRA weights
    are small, and `train`'s output is PEFT's files), so SHARDED_STATE_DICT is saved that way.
    """
    import os

    from finetune.config.schema import FSDP2_RESHARD

    if not config.uses_fsdp():
        return {}
    if config.fsdp_version != 2:
        raise TrainingError("fsdp: FSDP1 is not supported; set fsdp_version: 2 (FSDP2)")
    settings = config.fsdp_config or {}
    legacy = config.fsdp or []
    reshard = settings.get("reshard_after_forward")
    if reshard is None:
        reshard = FSDP2_RESHARD.get(
            settings.get("sharding_strategy"), "shard_grad_op" not in legacy
        )
    offload = bool(settings.get("offload_params") or "offload" in legacy)
    fsdp_config = {
        "version": 2,
        "reshard_after_forward": reshard,
        "cpu_offload": offload,
        "cpu_ram_efficient_loading": bool(settings.get("cpu_ram_efficient_loading")),
        "activation_checkpointing": bool(settings.get("activation_checkpointing")),
        "auto_wrap_policy": settings.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP"),
        "state_dict_type": "FULL_STATE_DICT",
    }
    for key in ("transformer_layer_cls_to_wrap", "min_num_params"):
        if key in settings:
            fsdp_config[key] = settings[key]
    if settings.get("state_dict_type") == "SHARDED_STATE_DICT":
        log(
            "note: fsdp_config.state_dict_type: SHARDED_STATE_DICT: checkpoints and the final "
            "adapter hold the whole adapter (FULL_STATE_DICT of the trained weights)"
        )
    # What `accelerate launch` with this FSDP config would export, read where TrainingArguments
    # cannot reach: the process group adds a CPU (gloo) backend for offloaded parameters and
    # full state dicts, and from_pretrained loads the weights on rank 0 only
    # (cpu_ram_efficient_loading; FSDP_CPU_RAM_EFFICIENT_LOADING is set by transformers).
    os.environ.update(
        ACCELERATE_USE_FSDP="true",
        FSDP_VERSION="2",
        FSDP_OFFLOAD_PARAMS=str(offload).lower(),
        FSDP_STATE_DICT_TYPE="FULL_STATE_DICT",
    )
    return {"fsdp": True, "fsdp_config": fsdp_config}


def total_steps(config: FinetuneConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run."""
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(steps_per_epoch * config.num_epochs))


def warmup_steps(config: FinetuneConfig, total: int) -> int:
    """Axolotl's warm-up: warmup_steps as given; warmup_ratio of all steps; neither: 3% of all
    steps, at most 100."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    if config.warmup_ratio is not None:
        return int(config.warmup_ratio * total)
    return min(int(0.03 * total), 100)


def learning_rate_schedule(config: FinetuneConfig) -> dict:
    """lr_scheduler_type and its kwargs; cosine_min_lr_ratio is HF's cosine_with_min_lr (the
    same curve as Axolotl's cosine with a floor)."""
    kwargs = dict(config.lr_scheduler_kwargs or {})
    scheduler = config.lr_scheduler
    if config.cosine_min_lr_ratio is not None:
        scheduler = "cosine_with_min_lr"
        kwargs["min_lr_rate"] = config.cosine_min_lr_ratio
    return {"lr_scheduler_type": scheduler, "lr_scheduler_kwargs": kwargs}


def evaluation_and_saving(config: FinetuneConfig, steps_per_epoch: int, has_eval: bool, log):
    """eval_* and save_* TrainingArguments.

    Early stopping restores the best checkpoint at the end, so a checkpoint must exist at every
    evaluation: save_steps is kept when it is a multiple of the evaluation interval, and
    otherwise replaced by it, with a note (Axolotl refuses such a config instead).
    """
    eval_strategy, eval_steps = "no", None
    if has_eval:
        eval_strategy, eval_steps = _every(
            config.eval_steps, config.evals_per_epoch, steps_per_epoch
        )
    save_strategy, save_steps = _every(config.save_steps, config.saves_per_epoch, steps_per_epoch)
    schedule = {
        "eval_strategy": eval_strategy,
        "eval_steps": eval_steps,
        "save_strategy": save_strategy,
        "save_steps": save_steps,
    }
    if not (config.early_stopping_patience and has_eval and eval_strategy != "no"):
        return schedule
    aligned = save_strategy == eval_strategy and (
        eval_strategy == "epoch" or (save_steps and eval_steps and save_steps % eval_steps == 0)
    )
    if not aligned:
        asked = "saves_per_epoch" if config.saves_per_epoch is not None else "save_steps"
        every = f"every {eval_steps} steps" if eval_steps else "every epoch"
        if config.save_steps is not None or config.saves_per_epoch is not None:
            log(
                f"note: early_stopping_patience: checkpoints are saved at every evaluation "
                f"({every}) so the best one can be restored; {asked} is replaced"
            )
        schedule.update(save_strategy=eval_strategy, save_steps=eval_steps)
    schedule.update(load_best_model_at_end=True, metric_for_best_model="eval_loss")
    return schedule


def _every(steps: int | float | None, per_epoch: int | None, steps_per_epoch: int):
    """(strategy, steps) for `*_steps` / `*s_per_epoch`; once per epoch by default."""
    if steps is not None:
        return "steps", steps
    if per_epoch == 0:
        return "no", None
    if per_epoch is not None:
        return "steps", max(1, math.floor(steps_per_epoch / per_epoch))
    return "epoch", None


def reporters(config: FinetuneConfig) -> list[str]:
    """The Trainer's own reporters, switched on only by their config keys (no telemetry)."""
    report = []
    if config.use_tensorboard:
        report.append("tensorboard")
    if config.wandb_enabled():
        for key, env in (
            ("wandb_project", "WANDB_PROJECT"),
            ("wandb_entity", "WANDB_ENTITY"),
            ("wandb_mode", "WANDB_MODE"),
            ("wandb_run_id", "WANDB_RUN_ID"),
        ):
            if getattr(config, key):
                os.environ[env] = getattr(config, key)
        report.append("wandb")
    if config.mlflow_enabled():
        for key, env in (
            ("mlflow_tracking_uri", "MLFLOW_TRACKING_URI"),
            ("mlflow_experiment_name", "MLFLOW_EXPERIMENT_NAME"),
        ):
            if getattr(config, key):
                os.environ[env] = getattr(config, key)
        report.append("mlflow")
    return report or ["none"]


def check_reporter_packages(config: FinetuneConfig) -> None:
    """A reporter whose package is missing fails now, not after the data and model loaded."""
    import importlib.util

    for asked, key, package in (
        (config.use_tensorboard, "use_tensorboard", "tensorboard"),
        (config.wandb_enabled(), "wandb_project", "wandb"),
        (config.mlflow_enabled(), "mlflow_tracking_uri", "mlflow"),
    ):
        if asked and importlib.util.find_spec(package) is None:
            raise TrainingError(f"{key} needs the {package} package: pip install {package}")
