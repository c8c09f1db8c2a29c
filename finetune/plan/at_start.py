"""What `train` says about memory before it loads the model: the plan's one-line summary, and a
warning with the one change that fits when the plan says the run will not.

The memory plan measures two training steps on each of three shortened copies of the model
(`make_plan(memory_only=True)`). That is nothing next to a real run, but it is not nothing next
to a run of a few steps: by default `train` plans when the measured steps would cost at most
`PLAN_SHARE` of the run's compute, and otherwise says it skipped the plan and how to get it
(`--plan` forces it, `--no-plan` skips it). The share is counted in multiply-adds from the
model's shape, the plan's 1- and 2-layer steps against every optimizer step of the run.
"""

from __future__ import annotations

from collections.abc import Callable

from finetune.config import FinetuneConfig
from finetune.model.load import text_config
from finetune.plan.estimate import MEASURE_TOKENS

PLAN_SHARE = 0.02  # the most of a run's compute the plan at its start may cost by default


def plan_cost_share(config: FinetuneConfig, model_config, run_tokens: int) -> float:
    """The plan's measured steps over the run's training steps, in forward multiply-adds per
    token (a decoder layer's linear weights, and the output head over the vocabulary)."""
    text = text_config(model_config)
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    layer += 3 * hidden * intermediate
    head = hidden * text.vocab_size
    measured = min(config.micro_batch_size * config.sequence_len, MEASURE_TOKENS)
    # two steps each: 1 layer at T/2 and at T tokens, 2 layers at T tokens
    one, two = layer + head, 2 * layer + head
    plan = 2 * (measured / 2 * one + measured * one + measured * two)
    run = max(run_tokens, 1) * (text.num_hidden_layers * layer + head)
    return plan / run


def run_tokens(config: FinetuneConfig, lengths: list[int], world_size: int = 1) -> int:
    """Token slots the run trains on: its epochs over the data, or max_steps' worth."""
    tokens = int(sum(lengths) * config.num_epochs)
    if config.max_steps:
        per_step = config.micro_batch_size * config.sequence_len
        per_step *= config.gradient_accumulation_steps * world_size
        tokens = min(tokens, config.max_steps * per_step)
    return tokens


def plan_at_start(
    config: FinetuneConfig,
    lengths: list[int],
    log: Callable[[str], None],
    choice: bool | None = None,
    world_size: int = 1,
    budget_bytes: int | None = None,
) -> None:
    """Print the memory plan's summary (and a warning when it does not fit); `choice` None
    decides by cost (see the module), True forces the plan, False skips it silently."""
    import contextlib
    import sys

    from finetune.model.load import load_model_config
    from finetune.plan.estimate import make_plan
    from finetune.plan.gpus import this_gpu
    from finetune.plan.report import gigabytes, summary_line

    if choice is False:
        return
    model_config = load_model_config(config)
    if choice is None:
        share = plan_cost_share(config, model_config, run_tokens(config, lengths, world_size))
        if share > PLAN_SHARE:
            log(
                f"plan: skipped, this run is short (its measured steps would cost about "
                f"{share:.0%} of the run); `finetune plan CONFIG` predicts memory and time, "
                "`train --plan` plans here"
            )
            return
    gpu = this_gpu()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries that print while steps run
            plan = make_plan(
                config,
                gpu,
                world_size if gpu is not None else 1,
                log=lambda message: None,
                budget_bytes=budget_bytes,
                memory_only=True,
            )
    except Exception as error:  # noqa: BLE001 (a plan that fails must not stop the run)
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        log(f"plan: could not plan this run ({reason}); training goes on without it")
        return
    log(summary_line(plan))
    if not plan.fits:
        change = ""
        if plan.suggestion and plan.suggestion.startswith("no single"):
            change = f"; {plan.suggestion}"
        elif plan.suggestion:
            change = f"; it fits with {plan.suggestion}"
        log(
            f"warning: the plan says this run needs {gigabytes(plan.peak_memory_bytes)} of "
            f"{gigabytes(plan.budget_bytes)} and may run out of memory{change} "
            "(`finetune plan CONFIG` shows the breakdown)"
        )
