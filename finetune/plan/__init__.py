"""The plan stage: `finetune plan CONFIG` predicts a run's peak memory (accelerator or CPU RAM),
disk and time before anything is downloaded or trained, and says which single change makes a
run fit that does not."""

from finetune.plan.estimate import Plan, make_plan

__all__ = ["Plan", "make_plan"]
