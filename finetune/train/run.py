"""`finetune train`: check -> data -> model -> batching -> trainer -> save.

The output folder (DESIGN.md): adapter_config.json + adapter_model.safetensors, the tokenizer
with the run's chat template, the resolved config.yaml, metrics.jsonl, loss.png, and
checkpoint-N/ folders while training.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from finetune.config import FinetuneConfig, render_config
from finetune.data.packing import steps_per_epoch
from finetune.errors import TrainingError
from finetune.train.arguments import check_reporter_packages, training_arguments
from finetune.train.batching import batch_plans, collator
from finetune.train.checkpoints import (
    checkpoint_to_resume,
    complete_checkpoints,
    save_final,
    save_on_interrupt,
    sigterm_as_interrupt,
)
from finetune.train.launch import is_main_process, set_rendezvous_for_single_process
from finetune.train.metrics import MetricsFile, plot_losses, start_metrics_log
from finetune.train.trainer import FinetuneTrainer


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float | None
    model: torch.nn.Module


def train(
    config: FinetuneConfig,
    *,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Train the adapter described by `config`; returns where it was written."""
    if not is_main_process():
        log = _silent  # one process speaks for all
    output_dir = Path(config.output_dir)
    checkpoint = _check_before_loading(config, output_dir, resume, force)
    tokenizer, prepared = _prepare_data(config, log)
    model = _build_model(config, tokenizer, log)
    trainer = _build_trainer(config, model, tokenizer, prepared, checkpoint, callbacks, log)
    output = _run(trainer, checkpoint, output_dir)
    _save(trainer, tokenizer, config, output_dir)
    return TrainResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        final_loss=output.training_loss,
        model=trainer.model,
    )


def _silent(message: str) -> None:
    pass


def _check_before_loading(
    config: FinetuneConfig, output_dir: Path, resume: bool, force: bool
) -> Path | None:
    """Everything that can fail without loading anything; the checkpoint to resume, if any."""
    from finetune.machine import check_combinations_for_machine
    from finetune.model.source import check_base_model

    check_combinations_for_machine(config)
    check_base_model(config)
    check_reporter_packages(config)
    checkpoint = checkpoint_to_resume(config, output_dir, resume, force)
    set_rendezvous_for_single_process(config)
    return checkpoint


def _prepare_data(config: FinetuneConfig, log):
    """The tokenizer (with the run's chat template) and the prepared, cached datasets."""
    from finetune.data.prepare import prepare_datasets
    from finetune.data.summary import format_summary
    from finetune.model.load import load_tokenizer

    tokenizer = load_tokenizer(config)
    prepared = prepare_datasets(config, tokenizer, log=log)
    log(format_summary(prepared.summary))
    if prepared.chat_template:
        tokenizer.chat_template = prepared.chat_template
    return tokenizer, prepared


def _build_model(config: FinetuneConfig, tokenizer, log) -> torch.nn.Module:
    """The base model with its attention backend, and the adapter attached."""
    from finetune.machine import keep_freed_memory_for_reuse
    from finetune.model.load import load_model
    from finetune.train.attention import register_attention

    keep_freed_memory_for_reuse()  # CPU: no page faults for each step's activations
    set_seed(config.seed)  # the adapter's initial weights too come from the seed
    attention = config.attn_implementation
    if config.sample_packing and attention == "sdpa":
        attention = register_attention()  # per-sample SDPA: packing's speed-up on any device
    model = load_model(config, tokenizer, attn_implementation=attention)
    if config.adapter:
        from finetune.model.adapters import attach_adapter

        model = attach_adapter(model, config, log=log)
    return model


def _build_trainer(
    config: FinetuneConfig, model, tokenizer, prepared, checkpoint, callbacks, log
) -> FinetuneTrainer:
    """Batch plans, TrainingArguments, callbacks and the Trainer that runs them."""
    output_dir = Path(config.output_dir)
    args = training_arguments(config, output_dir, steps=1)  # sets up the distributed state
    train_plan, eval_plan = batch_plans(config, prepared, args.process_index, args.world_size)
    steps = steps_per_epoch(train_plan, config.gradient_accumulation_steps)
    args = training_arguments(config, output_dir, steps=steps, has_eval=eval_plan is not None)
    if train_plan.efficiency is not None:
        log(
            f"packing: {len(train_plan.groups)} rows of {config.sequence_len} tokens, "
            f"efficiency {train_plan.efficiency:.3f} (real tokens / token slots)"
        )
    log(f"{steps} optimizer steps per epoch, {args.world_size} process(es)")

    callbacks = list(callbacks or [])
    if args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        start_metrics_log(output_dir / "metrics.jsonl", checkpoint)
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
        collate=collator(config, tokenizer.pad_token_id, config.sample_packing),
        eval_collate=collator(config, tokenizer.pad_token_id, config.eval_sample_packing),
    )
    trainer.say = log
    return trainer


def _run(trainer: FinetuneTrainer, checkpoint: Path | None, output_dir: Path):
    """trainer.train(), with Ctrl-C / SIGTERM saving a resumable checkpoint and a full disk
    explained."""
    try:
        with sigterm_as_interrupt():
            return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        save_on_interrupt(trainer, output_dir, trainer.say)
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


def _save(trainer: FinetuneTrainer, tokenizer, config: FinetuneConfig, output_dir: Path) -> None:
    """The final adapter (last, as the mark of a finished run's weights), then the tokenizer,
    the resolved config and the loss plot."""
    save_final(trainer, output_dir)
    if not trainer.is_world_process_zero():
        return
    # The Trainer pickles its arguments next to the model; the output keeps to safetensors/JSON.
    (output_dir / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / "config.yaml").write_text(render_config(config))
    plot_losses(output_dir / "metrics.jsonl", output_dir / "loss.png")
