"""The HF Trainer with our batches (packed or padded), our loss (kept tokens only) and our
per-step reporting (trained tokens, tokens/s, packing efficiency, loss explosions)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from finetune.data.packing import BatchPlan, PaddedSamples
from finetune.errors import LossNotFinite
from finetune.train.loss import kept_token_loss


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
            PaddedSamples(eval_dataset or self.eval_dataset),
            batch_sampler=self.eval_plan,
            collate_fn=self.eval_collate,
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The eval loss: the mean over every evaluated token, each sample counted once on
        whichever process has it (sums reduced across processes), so it is the same for any
        batching and any number of processes."""
        loader = self.get_eval_dataloader(eval_dataset)
        model = self.model_wrapped  # the DDP / DeepSpeed engine while training
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # loss sum, tokens
        with torch.no_grad():
            for inputs in loader:
                loss_sum, _, count = kept_token_loss(
                    model, self._prepare_inputs(inputs), num_items_in_batch=1
                )
                totals += torch.stack([loss_sum.detach().double(), count.double()]).to(totals)
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        metrics = {
            f"{metric_key_prefix}_loss": (totals[0] / totals[1]).item(),
            f"{metric_key_prefix}_tokens": int(totals[1].item()),
            f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 4),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        if was_training:
            model.train()
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs, count = kept_token_loss(model, inputs, num_items_in_batch)
        # Normalized by the token count of the whole optimizer step (all ranks), the loss needs
        # no further division by gradient_accumulation_steps.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        if model.training:
            self._tokens_since_log += int(count)
            if not self._finite_on_every_rank(loss):
                value = loss.item()
                where = str(value) if not math.isfinite(value) else "not finite on another process"
                raise LossNotFinite(
                    f"the loss became {where} at step {self.state.global_step + 1} "
                    f"(learning_rate {self._get_learning_rate():.3g}); lower learning_rate or "
                    "check the data. Checkpoints saved so far are kept."
                )
        return (loss, outputs) if return_outputs else loss

    def _finite_on_every_rank(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process. Reduced across processes before any
        backward, so a NaN on one rank stops all of them at the same step with the same message,
        instead of leaving the others waiting in the gradient all-reduce until ddp_timeout."""
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _sum_over_processes(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.int64, device=self.accelerator.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return int(total.item())

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            # Every process logs at the same step, so the counts are summed exactly.
            tokens = self._sum_over_processes(self._tokens_since_log)
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
