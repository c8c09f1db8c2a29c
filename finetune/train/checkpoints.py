"""Checkpoints and the run folder's life: starting fresh (moving an old run aside), what to
resume from (only this run's checkpoints), saving on interrupt, and the final save that marks a
run finished."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from finetune.config import FinetuneConfig
from finetune.errors import TrainingError
from finetune.fs import publish_files
from finetune.runfolder import (
    RunRecord,
    checkpoint_run_id,
    mark_checkpoint,
    move_run_aside,
    new_record,
    read_record,
)

# The final adapter's weights: their presence in output_dir marks a finished run.
FINAL_ADAPTER = "adapter_model.safetensors"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders that were written to the end, oldest first.

    The Trainer writes trainer_state.json last, so a folder without a readable one was cut off
    while being written and must never be loaded. The run's id is written into a checkpoint
    after the Trainer's files, so a checkpoint without it was cut off as well.
    """
    found = []
    for folder in output_dir.glob("checkpoint-*"):
        suffix = folder.name.rsplit("-", 1)[-1]
        if not suffix.isdigit() or checkpoint_run_id(folder) is None:
            continue
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append((int(suffix), folder))
    return [folder for _, folder in sorted(found)]


@dataclass
class RunStart:
    """How a run begins: from scratch or from a checkpoint, under which record."""

    checkpoint: Path | None
    record: RunRecord
    moved_aside: Path | None = None  # the previous run, deleted once this one finishes


def start_run(
    config: FinetuneConfig, output_dir: Path, resume: bool, force: bool, main: bool, log
) -> RunStart:
    """Decide what this run continues from; refuse to overwrite a run unless asked to, and never
    resume a checkpoint of another run."""
    finished = (output_dir / FINAL_ADAPTER).is_file()
    if config.resume_from_checkpoint:
        path = Path(config.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise TrainingError(
                f"resume_from_checkpoint: {path} is not a complete checkpoint folder"
            )
        return _resumed(path, read_record(output_dir) or new_record(config), log)
    if force:
        moved = move_run_aside(output_dir) if main else None
        if moved is not None:
            log(f"--force: the previous run in {output_dir} moved to {moved} until this one ends")
        return RunStart(None, new_record(config), moved)
    if finished:
        raise TrainingError(
            f"output_dir: {output_dir} already holds a finished run; pass --force to start over "
            "(it is replaced), or set another output_dir"
        )
    checkpoints = complete_checkpoints(output_dir) if output_dir.is_dir() else []
    if not (resume or config.auto_resume_from_checkpoints):
        if checkpoints:
            raise TrainingError(
                f"output_dir: {output_dir} holds checkpoints of an unfinished run; continue it "
                "with --resume, or pass --force to start over"
            )
        return RunStart(None, new_record(config))
    if not checkpoints:
        if resume:
            raise TrainingError(f"--resume: {output_dir} has no complete checkpoint to resume from")
        return RunStart(None, new_record(config))
    record = read_record(output_dir)
    newest = checkpoints[-1]
    if record is None or checkpoint_run_id(newest) != record.run_id:
        raise TrainingError(
            f"{newest}: this checkpoint belongs to another run than {output_dir}/run.json "
            "records; it is not resumed. Pass --force to start over"
        )
    return _resumed(newest, record, log)


def _resumed(checkpoint: Path, record: RunRecord, log) -> RunStart:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    log(f"resuming from {checkpoint} (step {state.get('global_step', '?')})")
    return RunStart(checkpoint, record)


class MarkCheckpoints(TrainerCallback):
    """Writes the run's id into every checkpoint the Trainer saves (main process)."""

    def __init__(self, output_dir: Path, run_id: str):
        self.output_dir, self.run_id = output_dir, run_id

    def on_save(self, args, state, control, **kwargs):
        folder = self.output_dir / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            mark_checkpoint(folder, self.run_id)


@contextmanager
def sigterm_as_interrupt():
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


def save_final(trainer, output_dir: Path) -> None:
    """Save the adapter next to the output, then move its files in; the weights file, the mark
    of a finished run, arrives last, so an interrupted save never looks finished."""
    # One name on every rank: ZeRO-3 gathers the weights on all of them to save.
    staging = output_dir / ".final-tmp"
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        publish_files(staging, output_dir, last=FINAL_ADAPTER)


def save_on_interrupt(trainer, output_dir: Path, run_id: str, log) -> None:
    """Ctrl-C: keep the work done so far as a resumable checkpoint and the adapter."""
    if trainer.state.global_step == 0:
        return
    # Trainer._save_checkpoint is private, but it is the one way to write a checkpoint the
    # Trainer itself can resume from (transformers 5.24).
    trainer._save_checkpoint(trainer.model, trial=None)
    if trainer.is_world_process_zero():
        mark_checkpoint(output_dir / f"checkpoint-{trainer.state.global_step}", run_id)
    # Every process: under ZeRO-3 and FSDP, gathering the weights is collective (only the main
    # process writes); called on one process it would wait forever for the others.
    trainer.save_model(str(output_dir / "interrupted"))
    log(
        f"interrupted at step {trainer.state.global_step}: checkpoint saved in {output_dir}; "
        "continue with `finetune train CONFIG --resume`"
    )
