"""EleutherAI's lm-evaluation-harness, when installed (`pip install 'finetune[eval]'`): the base
and the fine-tuned model on the same tasks, through the harness's own Hugging Face model class
(`HFLM`, which loads a base with a PEFT adapter itself).

Everything that can be missing is checked before any model runs: the package, the task names,
and the tasks' data (the harness downloads it from the Hugging Face Hub; offline, it must be in
the local datasets cache already). Each problem is one EvaluationError line saying what to run.
"""

from __future__ import annotations

import importlib.util

from finetune.errors import EvaluationError

INSTALL = "pip install 'finetune[eval]'  (or: pip install 'lm-eval[hf]')"


def require_lm_eval() -> None:
    """Fail at once when the harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise EvaluationError(
            f"--lm-eval needs EleutherAI's lm-evaluation-harness, which is not installed; run: "
            f"{INSTALL}"
        )


def load_tasks(names: list[str]):
    """The harness's task manager, with every task of `names` known and its data loadable."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager()
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise EvaluationError(
            f"--lm-eval: unknown task(s) {', '.join(unknown)}; list the harness's tasks with "
            "`lm-eval ls tasks`"
        )
    try:
        get_task_dict(names, manager)  # loads each task's dataset now, not after an hour
    except Exception as exc:  # the harness and `datasets` raise many kinds for missing data
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EvaluationError(
            f"--lm-eval {','.join(names)}: the task data cannot be loaded ({type(exc).__name__}: "
            f"{first_line[:200]}); the harness downloads it from the Hugging Face Hub: run once "
            "with network access (offline, it must already be in the datasets cache)"
        ) from None
    return manager


def run_lm_eval(
    names: list[str],
    manager,
    pretrained: str,
    tokenizer: str,
    peft: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for one model (a base, with `peft` an adapter folder on it)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model = HFLM(
        pretrained=pretrained,
        tokenizer=tokenizer,
        peft=peft,
        batch_size=batch_size,
        device=device or ("cuda" if _cuda() else "cpu"),
        dtype=dtype,
    )
    output = simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit)
    return {
        task: {
            metric.split(",")[0]: float(value)
            for metric, value in values.items()
            if isinstance(value, int | float) and "stderr" not in metric and metric != "samples"
        }
        for task, values in (output or {}).get("results", {}).items()
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
