"""What an evaluation found, as `eval.json` and as the tables `finetune eval` prints."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.evaluate.agreement import Agreement
from finetune.fs import hidden_sibling

EVAL_FILE = "eval.json"
WIDTH = 72  # of a prompt or an answer in --show


@dataclass
class ModelResult:
    model: str  # "base", "base + adapter", "merged"
    loss: float
    perplexity: float
    exact_match: float
    contains: float
    token_f1: float
    lm_eval: dict[str, dict[str, float]] | None = None


@dataclass
class AnswerPair:
    prompt: str  # what differs between the samples' prompts (the question), for reading
    reference: str
    base: str
    finetuned: str
    base_f1: float
    finetuned_f1: float


@dataclass
class EvalReport:
    source: str
    samples: int
    tokens: int
    base: ModelResult
    finetuned: ModelResult
    answers: list[AnswerPair] = field(default_factory=list)
    without_prompt: int = 0
    merged: Agreement | None = None
    gguf: Agreement | None = None

    def as_json(self) -> dict:
        values = {
            "data": self.source,
            "samples": self.samples,
            "trained_tokens": self.tokens,
            "base": asdict(self.base),
            "finetuned": asdict(self.finetuned),
        }
        if self.merged is not None:
            values["merged_agreement"] = self.merged.as_dict()
        if self.gguf is not None:
            values["gguf_agreement"] = self.gguf.as_dict()
        values["answers"] = [asdict(pair) for pair in self.answers]
        return values


def write_report(report: EvalReport, run_dir: Path) -> Path:
    """`run_dir/eval.json`, replaced atomically."""
    target = Path(run_dir) / EVAL_FILE
    staging = hidden_sibling(target)
    staging.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    staging.replace(target)
    return target


def format_report(report: EvalReport, show: int = 0) -> str:
    """The results table, the agreement lines and, with `show`, the worst regressions and the
    best gains."""
    base, tuned = report.base, report.finetuned
    heading = "fine-tuned" if tuned.model == "base + adapter" else f"fine-tuned ({tuned.model})"
    lines = [
        f"held-out data: {report.source}: {report.samples} samples, {report.tokens} trained tokens",
        f"{'':<14}{'base':>12}{heading:>22}{'change':>12}",
        _row("loss", base.loss, tuned.loss, "{:.4f}"),
        _row("perplexity", base.perplexity, tuned.perplexity, "{:.2f}"),
    ]
    if report.answers:
        lines += [
            _share_row("exact match", base.exact_match, tuned.exact_match),
            _share_row("contains", base.contains, tuned.contains),
            _row("token F1", base.token_f1, tuned.token_f1, "{:.3f}"),
        ]
        better = sum(p.finetuned_f1 > p.base_f1 for p in report.answers)
        worse = sum(p.finetuned_f1 < p.base_f1 for p in report.answers)
        same = len(report.answers) - better - worse
        lines.append(
            f"greedy answers by token F1: {better} better, {worse} worse, {same} the same"
            + ("" if show else " (--show N lists them)")
        )
    if report.without_prompt:
        lines.append(
            f"{report.without_prompt} samples are trained from their first token (no prompt): "
            "in the loss, not in the answers"
        )
    lines += _harness_rows(base, tuned)
    for agreement in (report.merged, report.gguf):
        if agreement is not None:
            lines.append(format_agreement(agreement))
    if show:
        lines += _examples(report.answers, show)
    return "\n".join(lines)


def format_agreement(agreement: Agreement) -> str:
    allowed = (
        f"allowed {agreement.allowed_logit_diff:.3g}"
        if agreement.allowed_logit_diff is not None
        else "rounding, not judged"
    )
    tokenizer = (
        f", its tokenizer encodes {agreement.tokenizer_mismatches} prompts differently"
        if agreement.tokenizer_mismatches
        else ""
    )
    verdict = "ok" if agreement.ok else "FAILED"
    return (
        f"{agreement.candidate} vs {agreement.reference}: {agreement.same_answers}/"
        f"{agreement.answers} greedy answers identical, max |logit difference| "
        f"{agreement.max_logit_diff:.3g} ({allowed}){tokenizer}: {verdict}"
    )


def _row(name: str, base: float, tuned: float, number: str) -> str:
    change = tuned - base
    sign = "+" if change >= 0 else "-"
    return (
        f"{name:<14}{number.format(base):>12}{number.format(tuned):>22}"
        f"{sign + number.format(abs(change)):>12}"
    )


def _share_row(name: str, base: float, tuned: float) -> str:
    change = 100 * (tuned - base)
    sign = "+" if change >= 0 else "-"
    return f"{name:<14}{base:>12.1%}{tuned:>22.1%}{sign + format(abs(change), '.1f') + ' pt':>12}"


def _harness_rows(base: ModelResult, tuned: ModelResult) -> list[str]:
    if not base.lm_eval or not tuned.lm_eval:
        return []
    lines = [f"{'lm-eval':<30}{'base':>10}{'fine-tuned':>12}{'change':>10}"]
    for task, metrics in base.lm_eval.items():
        for metric, value in metrics.items():
            other = tuned.lm_eval.get(task, {}).get(metric)
            if other is None:
                continue
            lines.append(
                f"{task + ' ' + metric:<30}{value:>10.4f}{other:>12.4f}{other - value:>+10.4f}"
            )
    return lines


def _examples(pairs: list[AnswerPair], show: int) -> list[str]:
    indexed = list(enumerate(pairs, start=1))
    worse = sorted(
        (item for item in indexed if item[1].finetuned_f1 < item[1].base_f1),
        key=lambda item: item[1].finetuned_f1 - item[1].base_f1,
    )[:show]
    better = sorted(
        (item for item in indexed if item[1].finetuned_f1 > item[1].base_f1),
        key=lambda item: item[1].base_f1 - item[1].finetuned_f1,
    )[:show]
    lines = ["", "worst regressions (the fine-tuned model lost what the base answered, by F1):"]
    lines += [line for item in worse for line in _example(*item)] or ["  none"]
    lines += ["", "best gains:"]
    lines += [line for item in better for line in _example(*item)] or ["  none"]
    return lines


def _example(number: int, pair: AnswerPair) -> list[str]:
    return [
        f"  #{number} {_clip(pair.prompt)}",
        f"     reference   {_clip(pair.reference)}",
        f"     base        {_clip(pair.base)}  (F1 {pair.base_f1:.2f})",
        f"     fine-tuned  {_clip(pair.finetuned)}  (F1 {pair.finetuned_f1:.2f})",
    ]


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= WIDTH else text[: WIDTH - 1] + "…"
