"""Checkpoints and the run folder's life: what to resume from, saving on interrupt, and the final
save that marks a run finished."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

from finetune.config import FinetuneConfig
from finetune.errors import TrainingError
from finetune.fs import publish_files

# The final adapter's weights: their presence in output_dir marks a finished run.
FINAL_ADAPTER = "adapter_model.safetensors"


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


def checkpoint_to_resume(
    config: FinetuneConfig, output_dir: Path, resume: bool, force: bool
) -> Path | None:
    """The checkpoint this run continues from, None for a fresh start; refuses to overwrite a
    finished or unfinished run unless asked to."""
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


def save_on_interrupt(trainer, output_dir: Path, log) -> None:
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
