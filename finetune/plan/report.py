"""What `finetune plan` prints: a one-line verdict, the memory breakdown, disk and time."""

from __future__ import annotations

from dataclasses import asdict

from finetune.plan.estimate import Plan

LABELS = {
    "weights": "base weights",
    "adapter": "adapter (trained weights)",
    "gradients": "gradients",
    "optimizer": "optimizer states (AdamW)",
    "activations": "activations + loss (at the peak)",
    "allocator": "allocator overhead",
    "runtime": "runtime (process / CUDA context)",
}


def gigabytes(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def summary_line(plan: Plan) -> str:
    verdict = "fits" if plan.fits else "does NOT fit"
    line = (
        f"plan: peak {gigabytes(plan.peak_memory_bytes)} on {plan.device}, {verdict} "
        f"(budget {gigabytes(plan.budget_bytes)})"
    )
    if plan.seconds_per_epoch is not None:
        line += f"; about {_duration(plan.seconds_per_epoch)} per epoch"
    return line


def format_plan(plan: Plan) -> str:
    lines = [summary_line(plan), "", "memory at the peak of a training step, per process:"]
    for key, value in asdict(plan.breakdown).items():
        lines.append(f"  {LABELS[key]:<36} {gigabytes(value):>10}")
    lines.append(f"  {'total':<36} {gigabytes(plan.peak_memory_bytes):>10}")
    lines += [
        "",
        f"tokens per micro-batch: {plan.tokens_per_micro_batch}; activations "
        f"{plan.activation_bytes_per_token / 1e3:.1f} kB per token",
    ]
    if plan.seconds_per_step is not None:
        lines.append(f"time per optimizer step: {plan.seconds_per_step:.2f} s ({plan.time_basis})")
    if plan.tokens_per_epoch is not None:
        lines.append(
            f"per epoch: {plan.tokens_per_epoch:,} tokens, {plan.steps_per_epoch} optimizer "
            f"steps, about {_duration(plan.seconds_per_epoch)}"
        )
    lines.append(
        f"disk: checkpoints about {gigabytes(plan.checkpoint_bytes)}, merged model "
        f"{gigabytes(plan.merged_bytes)}"
    )
    if plan.suggestion:
        lines.append(f"to fit: {plan.suggestion}")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
