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
from finetune.train.attention_choice import AttentionChoice, choose_attention
from finetune.train.batching import batch_plans, collator
from finetune.train.checkpoints import (
    MarkCheckpoints,
    RunStart,
    complete_checkpoints,
    save_final,
    save_on_interrupt,
    sigterm_as_interrupt,
    start_run,
)
from finetune.train.launch import is_main_process, set_rendezvous_for_single_process
from finetune.train.metrics import LossWatchdog, MetricsFile, plot_losses, start_metrics_log
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
    before_model: Callable[[FinetuneConfig, list[int], Callable[[str], None]], None] | None = None,
) -> TrainResult:
    """Train the adapter described by `config`; returns where it was written.

    `auto` settings are decided for this machine first; what the run used is recorded in
    output_dir/run.json for the later verbs. `before_model(config, lengths, log)` runs on the
    main process once the data is prepared (the training samples' lengths), before anything
    distributed starts or the model loads: the CLI's memory plan.
    """
    from finetune.machine import resolve_for_machine

    if not is_main_process():
        log = _silent  # one process speaks for all
    config = resolve_for_machine(config)
    output_dir = Path(config.output_dir)
    start = _check_before_loading(config, output_dir, resume, force, log)
    tokenizer, prepared = _prepare_data(config, log)
    if before_model is not None and is_main_process():
        before_model(config, list(prepared.train["length"]), log)
    # TrainingArguments before the model: they set up the processes, and with a ZeRO-3 config
    # they make from_pretrained create the model already partitioned (deepspeed.zero.Init), so
    # no process ever holds the whole model. Kept alive until the Trainer has its own.
    distributed = training_arguments(config, output_dir, steps=1)
    _start_processes(config, distributed)
    model, attention = _build_model(config, tokenizer, log)
    callbacks = [*(callbacks or []), MarkCheckpoints(output_dir, start.record.run_id)]
    trainer = _build_trainer(
        config, model, tokenizer, prepared, attention, start.checkpoint, callbacks, log, distributed
    )
    _record_start(trainer, config, start, prepared, output_dir)
    output = _run(trainer, start, output_dir)
    _save(trainer, tokenizer, config, output_dir, start)
    return TrainResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        final_loss=output.training_loss,
        model=trainer.model,
    )


def _silent(message: str) -> None:
    pass


def _start_processes(config: FinetuneConfig, args) -> None:
    """Join the process group now, and hand it to DeepSpeed's communication layer: without that,
    zero.Init partitions for a world of one process (and DeepSpeed's batch check then fails)."""
    args.world_size  # noqa: B018 (TrainingArguments start the process group on first use)
    if config.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def _check_before_loading(
    config: FinetuneConfig, output_dir: Path, resume: bool, force: bool, log
) -> RunStart:
    """Everything that can fail without loading anything; where the run starts from."""
    from finetune.machine import check_combinations_for_machine, check_one_process_per_gpu
    from finetune.model.source import check_base_model

    check_combinations_for_machine(config)
    check_one_process_per_gpu()
    check_base_model(config)
    check_reporter_packages(config)
    start = start_run(config, output_dir, resume, force, is_main_process(), log)
    set_rendezvous_for_single_process(config)
    return start


def _record_start(trainer, config: FinetuneConfig, start: RunStart, prepared, output_dir) -> None:
    """output_dir/run.json: what this run uses, written before its first step."""
    from finetune.model.load import compute_dtype_name, quantization_config
    from finetune.model.source import model_source
    from finetune.runfolder import write_record

    record = start.record
    record.config = config.model_dump(mode="json")
    record.base_model_folder = model_source(config.base_model)
    record.compute_dtype = compute_dtype_name(config)
    quantization = quantization_config(config)
    record.quantization = quantization.to_dict() if quantization is not None else None
    record.chat_template = prepared.chat_template
    if trainer.is_world_process_zero():
        write_record(output_dir, record)


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


def _build_model(config: FinetuneConfig, tokenizer, log) -> tuple[torch.nn.Module, AttentionChoice]:
    """The base model with the attention `choose_attention` picked for it, and the adapter
    attached; the choice also tells the batching whether rows are packed."""
    from finetune.machine import tune_cpu_allocator
    from finetune.model.load import load_model, load_model_config
    from finetune.train.attention import PER_SAMPLE_ATTENTION, register_attention

    tune_cpu_allocator(config)  # CPU: keep activations' memory, or give it back (ckpt, ZeRO-3)
    set_seed(config.seed)  # the adapter's initial weights too come from the seed
    attention = choose_attention(config, load_model_config(config))
    log(f"attention: {attention.reason}")
    if attention.implementation == PER_SAMPLE_ATTENTION:
        register_attention()
    model = load_model(config, tokenizer, attn_implementation=attention.implementation, log=log)
    if config.adapter:
        from finetune.model.adapters import attach_adapter

        model = attach_adapter(model, config, log=log)
    return model, attention


def _build_trainer(
    config: FinetuneConfig,
    model,
    tokenizer,
    prepared,
    attention: AttentionChoice,
    checkpoint,
    callbacks,
    log,
    args,
) -> FinetuneTrainer:
    """Batch plans, TrainingArguments, callbacks and the Trainer that runs them; `args` are the
    first TrainingArguments (process rank and count)."""
    output_dir = Path(config.output_dir)
    train_plan, eval_plan = batch_plans(
        config, prepared, attention, args.process_index, args.world_size
    )
    steps = steps_per_epoch(train_plan, config.gradient_accumulation_steps)
    args = training_arguments(
        config, output_dir, steps=steps, has_eval=eval_plan is not None, log=log
    )
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
    if config.loss_watchdog_threshold is not None:
        callbacks.append(
            LossWatchdog(config.loss_watchdog_threshold, config.loss_watchdog_patience, log)
        )

    trainer = FinetuneTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
        train_plan=train_plan,
        eval_plan=eval_plan,
        collate=collator(config, tokenizer.pad_token_id, attention.packed),
        eval_collate=collator(config, tokenizer.pad_token_id, attention.eval_packed),
    )
    trainer.say = log
    return trainer


def _run(trainer: FinetuneTrainer, start: RunStart, output_dir: Path):
    """trainer.train(), with Ctrl-C / SIGTERM saving a resumable checkpoint and a full disk
    explained."""
    checkpoint = start.checkpoint
    try:
        with sigterm_as_interrupt():
            return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        save_on_interrupt(trainer, output_dir, start.record.run_id, trainer.say)
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


def _save(
    trainer: FinetuneTrainer, tokenizer, config: FinetuneConfig, output_dir: Path, start: RunStart
) -> None:
    """The final adapter (last, as the mark of a finished run's weights), then the tokenizer,
    the resolved config, the loss plot and the finished record; the run this one replaced
    (--force) is deleted only now."""
    import time

    from finetune.runfolder import delete_moved_run, write_record

    save_final(trainer, output_dir)
    if not trainer.is_world_process_zero():
        return
    # The Trainer pickles its arguments next to the model; the output keeps to safetensors/JSON.
    (output_dir / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(output_dir))
    _write_generation_config(trainer.model, tokenizer, output_dir, trainer.say)
    (output_dir / "config.yaml").write_text(render_config(config))
    plot_losses(output_dir / "metrics.jsonl", output_dir / "loss.png")
    start.record.finished = time.time()
    write_record(output_dir, start.record)
    delete_moved_run(start.moved_aside)


def _write_generation_config(model, tokenizer, output_dir: Path, log) -> None:
    """generation_config.json whose stop tokens include the end-of-turn token this run trained
    (a runtime stops at eos_token_id only), so the merged and exported models stop too."""
    import copy

    from finetune.data.chat_templates import end_of_turn_marker

    base = getattr(model, "get_base_model", lambda: model)()
    config = copy.deepcopy(base.generation_config)
    configured = config.eos_token_id
    stops = list(configured) if isinstance(configured, list | tuple) else [configured]
    added = []
    candidates = [tokenizer.eos_token_id]
    if tokenizer.chat_template:
        marker = end_of_turn_marker(tokenizer.chat_template, tokenizer)
        ids = tokenizer.encode(marker, add_special_tokens=False) if marker else []
        candidates += ids if len(ids) == 1 else []
    for token_id in candidates:
        if token_id is not None and token_id not in stops:
            stops.append(token_id)
            added.append(tokenizer.convert_ids_to_tokens(token_id))
    stops = [token_id for token_id in stops if token_id is not None]
    config.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else None)
    config.save_pretrained(str(output_dir))
    if added:
        log(f"generation_config: stop tokens {stops} (added {', '.join(added)}, which ends a turn)")
