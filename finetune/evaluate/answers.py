"""Greedy answers to the held-out prompts, and how close each is to its reference answer.

The prompt is the sample's own tokens before its first trained token, so the model sees exactly
what training showed it (template, system message, generation prompt). Generation is greedy and
deterministic, in left-padded batches, and stops at the run's stop tokens; each answer may be
as long as its reference plus `ANSWER_MARGIN` tokens.

Scores compare normalised words: lower case, split on whitespace, punctuation stripped from
each word's ends. Exact match: the same words. Contains: the reference's words appear, in
order and together, in the answer. Token F1: the harmonic mean of the precision and recall of
the answer's words against the reference's (SQuAD's measure).
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass

import torch

from finetune.evaluate.progress import progress_bar
from finetune.evaluate.samples import EvalSample

ANSWER_MARGIN = 32


@dataclass
class AnswerScores:
    exact_match: float
    contains: float
    token_f1: float
    answered: int  # samples with a prompt (the means are over these)


def greedy_answers(
    model,
    tokenizer,
    samples: list[EvalSample],
    stop_ids: list[int],
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    label: str = "answers",
) -> list[str | None]:
    """Each sample's greedy answer (None for a sample without a prompt)."""
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    answers: list[str | None] = [None] * len(samples)
    order = sorted(
        (i for i, sample in enumerate(samples) if sample.prompt_ids),
        key=lambda i: len(samples[i].prompt_ids),
    )
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress_bar(batches, label):
        limits = [max_new_tokens or len(samples[i].answer_ids) + ANSWER_MARGIN for i in batch]
        inputs = _left_padded([samples[i].prompt_ids for i in batch], pad_id)
        # A fresh GenerationConfig: the model's saved sampling defaults must not apply.
        config = GenerationConfig(
            max_new_tokens=max(limits), do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id
        )
        with torch.inference_mode():
            output = model.generate(
                **{k: v.to(device) for k, v in inputs.items()}, generation_config=config
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        for row, index in enumerate(batch):
            answers[index] = answer_text(tokenizer, new_tokens[row][: limits[row]], stop_ids)
    return answers


def answer_text(tokenizer, token_ids: list[int], stop_ids: list[int]) -> str:
    """The text of `token_ids` up to the first stop token."""
    end = next((i for i, token in enumerate(token_ids) if token in stop_ids), len(token_ids))
    return tokenizer.decode(
        token_ids[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def _left_padded(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def normalised_words(text: str) -> list[str]:
    words = (word.strip(string.punctuation) for word in text.lower().split())
    return [word for word in words if word]


def exact_match(answer: str, reference: str) -> bool:
    return normalised_words(answer) == normalised_words(reference)


def contains(answer: str, reference: str) -> bool:
    words, wanted = normalised_words(answer), normalised_words(reference)
    if not wanted:
        return not words
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))


def token_f1(answer: str, reference: str) -> float:
    words, wanted = normalised_words(answer), normalised_words(reference)
    if not words or not wanted:
        return float(words == wanted)
    common = sum((Counter(words) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(words), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def score_answers(answers: list[str | None], references: list[str]) -> AnswerScores:
    pairs = [(a, r) for a, r in zip(answers, references, strict=True) if a is not None]
    if not pairs:
        return AnswerScores(0.0, 0.0, 0.0, 0)
    n = len(pairs)
    return AnswerScores(
        exact_match=sum(exact_match(a, r) for a, r in pairs) / n,
        contains=sum(contains(a, r) for a, r in pairs) / n,
        token_f1=sum(token_f1(a, r) for a, r in pairs) / n,
        answered=n,
    )
