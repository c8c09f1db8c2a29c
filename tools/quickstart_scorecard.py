"""The quickstart's proof: did the fine-tuned model learn facts the base model cannot know?

A developer tool, not part of the `finetune` package (`make quickstart` runs it):

    python tools/quickstart_scorecard.py examples/configs/quickstart.yaml

Asks the base model, the trained adapter and the merged model every held-out question (new
phrasings of the trained facts) and the trained questions, greedily, and prints a before/after
table and the scores. A reply is right when it contains the row's key fact.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.config import load_config
from finetune.inference import end_of_turn_ids, load_for_inference
from finetune.model.source import resolve_base_model

HELDOUT = Path("data/samples/quickstart_heldout.jsonl")


@dataclass
class Question:
    text: str
    fact: str


def read_questions(path: Path, limit: int | None = None) -> list[Question]:
    """The first user turn and the key fact of each row."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    questions = [Question(row["messages"][0]["content"], row["fact"]) for row in rows]
    return questions[:limit] if limit else questions


def answer_all(model, tokenizer, questions: list[Question], max_new_tokens: int = 40) -> list[str]:
    """Greedy replies, generated in left-padded batches."""
    tokenizer.padding_side = "left"
    stop = end_of_turn_ids(model, tokenizer)
    replies = []
    for start in range(0, len(questions), 16):
        chunk = questions[start : start + 16]
        inputs = tokenizer.apply_chat_template(
            [[{"role": "user", "content": q.text}] for q in chunk],
            add_generation_prompt=True,
            padding=True,
            return_tensors="pt",
            return_dict=True,
        ).to(model.device)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = output[:, inputs["input_ids"].shape[1] :]
        replies += [r.strip() for r in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return replies


def correct(reply: str, question: Question) -> bool:
    return question.fact.lower() in reply.lower()


def score(replies: list[str], questions: list[Question]) -> float:
    return sum(correct(r, q) for r, q in zip(replies, questions, strict=True)) / len(questions)


def _clip(text: str, width: int, keep_end: bool = False) -> str:
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if keep_end else text[: width - 1] + "…"


def print_table(questions: list[Question], before: list[str], after: list[str]) -> None:
    width = 38
    print(f"{'held-out question':<44} | {'base model':<{width}} | {'fine-tuned':<{width}}")
    print("-" * (44 + 2 * width + 6))
    for q, b, a in zip(questions, before, after, strict=True):
        mark_b, mark_a = ("✓" if correct(b, q) else "✗"), ("✓" if correct(a, q) else "✗")
        print(
            # Answers restate the question first; their ends hold the facts.
            f"{_clip(q.text, 44):<44} | {mark_b} {_clip(b, width - 2, True):<{width - 2}} | "
            f"{mark_a} {_clip(a, width - 2, True):<{width - 2}}"
        )


@dataclass
class Scores:
    base_heldout: float
    tuned_heldout: float
    tuned_trained: float
    merged_agreement: float | None


def run(config_path: Path, heldout: Path, trained: Path | None, limit: int | None) -> Scores:
    config = load_config(config_path).config
    base_path = resolve_base_model(config.base_model)
    run_dir = Path(config.output_dir)
    questions = read_questions(heldout, limit)
    trained_questions = read_questions(trained, limit) if trained else []

    started = time.perf_counter()
    model, tokenizer = load_for_inference(base_path, dtype="float32")
    before = answer_all(model, tokenizer, questions)
    model, tokenizer = load_for_inference(base_path, run_dir, dtype="float32")
    after = answer_all(model, tokenizer, questions)
    after_trained = answer_all(model, tokenizer, trained_questions) if trained_questions else []
    agreement = None
    if (run_dir / "merged" / "config.json").is_file():
        model, tokenizer = load_for_inference(run_dir / "merged", dtype="float32")
        merged = answer_all(model, tokenizer, questions)
        agreement = sum(m == a for m, a in zip(merged, after, strict=True)) / len(after)

    print_table(questions, before, after)
    scores = Scores(
        base_heldout=score(before, questions),
        tuned_heldout=score(after, questions),
        tuned_trained=score(after_trained, trained_questions) if trained_questions else 0.0,
        merged_agreement=agreement,
    )
    print()
    if trained_questions:
        print(f"trained questions answered correctly (fine-tuned): {scores.tuned_trained:.0%}")
    print(f"held-out questions, base model:  {scores.base_heldout:.0%}")
    print(f"held-out questions, fine-tuned:  {scores.tuned_heldout:.0%}")
    if agreement is not None:
        print(f"merged model gives the adapter's greedy answer: {agreement:.0%} of held-out")
    print(f"(answered in {time.perf_counter() - started:.0f} s)")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description="Before/after check of the quickstart run.")
    parser.add_argument("config", type=Path)
    parser.add_argument("--heldout", type=Path, default=HELDOUT)
    parser.add_argument("--trained", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    run(args.config, args.heldout, args.trained, args.limit)


if __name__ == "__main__":
    main()
