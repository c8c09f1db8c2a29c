"""`finetune eval`: the base model against the fine-tuned model on the same held-out samples,
then the merged model or an exported GGUF against the fine-tuned model when asked.

Read top to bottom it is the evaluation's phases: check what was asked for, load base + adapter
once (the base is the same model with the adapter switched off), prepare the held-out samples,
score the base, score the fine-tuned model, compare the merged model and the GGUF, run the
harness, write eval.json, print the tables, and fail last when a comparison failed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from finetune.config import FinetuneConfig
from finetune.errors import EvaluationError
from finetune.evaluate import harness
from finetune.evaluate.agreement import (
    STRICT_GGUF_TYPES,
    Agreement,
    gguf_file_type,
    load_gguf,
    max_logit_difference,
    merge_tolerance,
    same_answers,
    tokenizer_mismatches,
)
from finetune.evaluate.answers import greedy_answers, score_answers, token_f1
from finetune.evaluate.loss import held_out_loss
from finetune.evaluate.report import (
    AnswerPair,
    EvalReport,
    ModelResult,
    format_report,
    write_report,
)
from finetune.evaluate.samples import EvalSample, eval_samples, held_out_data
from finetune.inference import end_of_turn_ids, load_for_inference
from finetune.runfolder import RunRecord, merge_settings

MERGED = "merged"


def evaluate_run(
    config: FinetuneConfig,
    run_dir: str | Path,
    record: RunRecord | None,
    *,
    data: str | Path | None = None,
    data_type: str | None = None,
    merged: bool = False,
    gguf: str | Path | None = None,
    lm_eval_tasks: list[str] | None = None,
    max_samples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    show: int = 0,
    log: Callable[[str], object] = print,
) -> EvalReport:
    """Evaluate the run in `run_dir` (its adapter, or `run_dir/merged` with `merged`) against
    its base model, write `run_dir/eval.json` and log the tables.

    Raises EvaluationError, after writing eval.json and logging the tables, when the merged
    model or the GGUF file does not compute what base + adapter computes.
    """
    run_dir = Path(run_dir)
    gguf = Path(gguf) if gguf else None
    _check_inputs(run_dir, merged, gguf)
    tasks = harness.load_tasks(lm_eval_tasks) if lm_eval_tasks else None
    held = held_out_data(config, data, data_type, log)
    settings = merge_settings(config, record)
    dtype = _eval_dtype(record)
    remote = {"trust_remote_code": config.trust_remote_code}

    log(f"loading {settings['base']} with the adapter in {run_dir}")
    model, tokenizer = load_for_inference(
        settings["base"],
        run_dir,
        dtype=dtype,
        model_kwargs={**remote, "revision": config.revision_of_model},
    )
    stop_ids = end_of_turn_ids(model, tokenizer)
    samples = eval_samples(held.rows, stop_ids, max_samples)
    log(f"evaluating on {held.source}: {len(samples)} samples")
    generate = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    with model.disable_adapter():
        base_loss = held_out_loss(model, samples, pad_id, label="base: loss")
        base_answers = greedy_answers(
            model, tokenizer, samples, stop_ids, label="base: answers", **generate
        )
    tuned_loss = held_out_loss(model, samples, pad_id, label="fine-tuned: loss")
    tuned_answers = greedy_answers(
        model, tokenizer, samples, stop_ids, label="fine-tuned: answers", **generate
    )
    tuned_name, tuned_model = "base + adapter", model

    merged_agreement = None
    if merged:
        log(f"loading the merged model in {run_dir / MERGED}")
        merged_model, _ = load_for_inference(run_dir / MERGED, dtype=dtype, model_kwargs=remote)
        merged_loss = held_out_loss(merged_model, samples, pad_id, label="merged: loss")
        merged_answers = greedy_answers(
            merged_model, tokenizer, samples, stop_ids, label="merged: answers", **generate
        )
        merged_agreement = _merged_agreement(
            model, merged_model, samples, tuned_answers, merged_answers, run_dir, dtype, record
        )
        tuned_name, tuned_model = MERGED, merged_model
        tuned_loss, tuned_answers = merged_loss, merged_answers

    gguf_agreement = None
    if gguf is not None:
        gguf_agreement = _gguf_agreement(
            gguf, tuned_model, tokenizer, samples, stop_ids, tuned_answers, generate, log
        )

    references = [_reference(tokenizer, sample) for sample in samples]
    base_scores = score_answers(base_answers, references)
    tuned_scores = score_answers(tuned_answers, references)
    report = EvalReport(
        source=held.source,
        samples=len(samples),
        tokens=base_loss.tokens,
        base=ModelResult("base", base_loss.loss, base_loss.perplexity, **_means(base_scores)),
        finetuned=ModelResult(
            tuned_name, tuned_loss.loss, tuned_loss.perplexity, **_means(tuned_scores)
        ),
        answers=_pairs(tokenizer, samples, references, base_answers, tuned_answers),
        without_prompt=sum(not sample.prompt_ids for sample in samples),
        merged=merged_agreement,
        gguf=gguf_agreement,
    )
    if tasks is not None:
        _run_harness(report, tasks, lm_eval_tasks, settings, run_dir, merged, config, log)
    path = write_report(report, run_dir)
    log(format_report(report, show))
    log(f"written to {path}")
    _raise_on_disagreement(report)
    return report


def _check_inputs(run_dir: Path, merged: bool, gguf: Path | None) -> None:
    """Everything a user can get wrong, before any model loads."""
    if not (run_dir / "adapter_config.json").is_file():
        raise EvaluationError(
            f"{run_dir}: no trained adapter there (adapter_config.json); train first "
            "(finetune train CONFIG), or point output_dir at the run"
        )
    if merged and not (run_dir / MERGED / "config.json").is_file():
        raise EvaluationError(
            f"--merged: no merged model in {run_dir / MERGED}; run `finetune merge CONFIG` first"
        )
    if gguf is not None and not gguf.is_file():
        raise EvaluationError(
            f"--gguf {gguf}: no such file; write it with `finetune export CONFIG --format gguf`"
        )


def _eval_dtype(record: RunRecord | None) -> torch.dtype:
    """fp32 on a CPU (exact, and bf16 is slow on most CPUs); the run's precision on a GPU."""
    from finetune.dtypes import FLOAT_DTYPES

    if not torch.cuda.is_available():
        return torch.float32
    return FLOAT_DTYPES.get((record.compute_dtype if record else None) or "fp32", torch.float32)


def _merged_agreement(
    adapter_model, merged_model, samples, adapter_answers, merged_answers, run_dir, dtype, record
) -> Agreement:
    diff, largest = max_logit_difference(
        adapter_model, merged_model, samples, label="merged vs adapter: logits"
    )
    quantized = bool(record and record.quantization and record.quantization.get("load_in_4bit"))
    tolerance = merge_tolerance(run_dir / MERGED, dtype, quantized)
    same, total = same_answers(adapter_answers, merged_answers)
    return Agreement(
        candidate="merged model",
        reference="base + adapter",
        same_answers=same,
        answers=total,
        max_logit_diff=diff,
        allowed_logit_diff=tolerance * max(1.0, largest),
    )


def _gguf_agreement(
    path: Path, tuned_model, tokenizer, samples, stop_ids, tuned_answers, generate, log
) -> Agreement:
    file_type = gguf_file_type(path)
    log(f"reading {path} ({file_type}) with transformers' GGUF reader")
    device = next(tuned_model.parameters()).device
    gguf_model, gguf_tokenizer = load_gguf(path, device)
    answers = greedy_answers(
        gguf_model, tokenizer, samples, stop_ids, label="GGUF: answers", **generate
    )
    diff, _ = max_logit_difference(tuned_model, gguf_model, samples, label="GGUF: logits")
    same, total = same_answers(tuned_answers, answers)
    quant = file_type.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    return Agreement(
        candidate=f"GGUF {quant}",
        reference="fine-tuned model",
        same_answers=same,
        answers=total,
        max_logit_diff=diff,
        allowed_logit_diff=None,
        tokenizer_mismatches=tokenizer_mismatches(
            tokenizer, gguf_tokenizer, [s for s in samples if s.prompt_ids]
        ),
        strict_answers=file_type in STRICT_GGUF_TYPES,
    )


def _run_harness(report, tasks, names, settings, run_dir: Path, merged: bool, config, log):
    log(f"lm-eval {', '.join(names)}: the base model")
    report.base.lm_eval = harness.run_lm_eval(
        names, tasks, pretrained=str(settings["base"]), tokenizer=str(run_dir)
    )
    log(f"lm-eval {', '.join(names)}: the fine-tuned model")
    report.finetuned.lm_eval = harness.run_lm_eval(
        names,
        tasks,
        pretrained=str(run_dir / MERGED if merged else settings["base"]),
        tokenizer=str(run_dir),
        peft=None if merged else str(run_dir),
    )


def _raise_on_disagreement(report: EvalReport) -> None:
    if report.merged is not None and not report.merged.ok:
        raise EvaluationError(
            f"the merged model does not compute what base + adapter computes (max |logit "
            f"difference| {report.merged.max_logit_diff:.3g}, allowed "
            f"{report.merged.allowed_logit_diff:.3g}); merge again: finetune merge CONFIG --force"
        )
    if report.gguf is not None and not report.gguf.ok:
        what = (
            f"its tokenizer encodes {report.gguf.tokenizer_mismatches} prompts differently"
            if report.gguf.tokenizer_mismatches
            else f"{report.gguf.answers - report.gguf.same_answers} greedy answers differ"
        )
        raise EvaluationError(
            f"the {report.gguf.candidate} file does not answer as the fine-tuned model does "
            f"({what}); export it again from the current merge: finetune export CONFIG --force"
        )


def _reference(tokenizer, sample: EvalSample) -> str:
    return tokenizer.decode(
        sample.answer_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def _means(scores) -> dict[str, float]:
    return {
        "exact_match": scores.exact_match,
        "contains": scores.contains,
        "token_f1": scores.token_f1,
    }


def _pairs(tokenizer, samples, references, base_answers, tuned_answers) -> list[AnswerPair]:
    questions = _questions(tokenizer, samples)
    return [
        AnswerPair(
            question, reference, base, tuned, token_f1(base, reference), token_f1(tuned, reference)
        )
        for question, reference, base, tuned in zip(
            questions, references, base_answers, tuned_answers, strict=True
        )
        if base is not None and tuned is not None
    ]


def _questions(tokenizer, samples: list[EvalSample]) -> list[str]:
    """What differs between the prompts: each prompt without the token prefix and suffix all
    of them share (the system message, the template's generation prompt)."""
    prompts = [s.prompt_ids for s in samples if s.prompt_ids]
    prefix = suffix = 0
    if len(prompts) > 1:
        shortest = min(len(p) for p in prompts)
        while prefix < shortest and len({p[prefix] for p in prompts}) == 1:
            prefix += 1
        while suffix < shortest - prefix and len({p[-1 - suffix] for p in prompts}) == 1:
            suffix += 1
    texts = []
    for sample in samples:
        ids = sample.prompt_ids[prefix : len(sample.prompt_ids) - suffix] or sample.prompt_ids
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts
