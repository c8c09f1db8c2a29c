"""metrics.jsonl (one JSON object per logged step) and loss.png, in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback


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


def start_metrics_log(path: Path, checkpoint: Path | None) -> None:
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


class LossWatchdog(TrainerCallback):
    """Axolotl's loss watchdog: stop when the logged loss stays above `threshold` for
    `patience` logs in a row (Axolotl counts optimizer steps re-reading the last logged loss;
    with logging_steps 1 the two agree)."""

    def __init__(self, threshold: float, patience: int, say):
        self.threshold, self.patience, self.say = threshold, patience, say
        self.above = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.above = self.above + 1 if logs["loss"] > self.threshold else 0
        if self.above >= self.patience:
            control.should_training_stop = True
            self.say(
                f"loss watchdog: the loss stayed above loss_watchdog_threshold {self.threshold:g} "
                f"for {self.above} logs (last {logs['loss']:.4g}); training stopped at step "
                f"{state.global_step}"
            )
