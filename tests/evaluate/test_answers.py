"""Answer scores on hand-worked examples, and greedy answers that are exactly what `finetune
inference` answers to the same question (the real SmolLM2-135M-Instruct, batched prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from finetune.evaluate.answers import contains, exact_match, greedy_answers, token_f1
from finetune.evaluate.samples import eval_samples, held_out_data
from finetune.inference import end_of_turn_ids, generate_reply, load_for_inference
from finetune.runfolder import run_config

SAMPLES = Path(__file__).parents[2] / "data" / "samples"


@pytest.mark.parametrize(
    ("answer", "reference", "exact", "inside", "f1"),
    [
        ("The capital is Quellport.", "the capital is quellport", True, True, 1.0),
        ("I think the capital is Quellport!", "The capital is Quellport.", False, True, 0.8),
        # 3 shared words: precision 3/4, recall 3/3 -> F1 6/7; not together, so not contained
        ("Quellport is not it", "Quellport is it", False, False, 6 / 7),
        ("capital Quellport", "Quellport capital", False, False, 1.0),
        ("", "Quellport", False, False, 0.0),
        ("", "", True, True, 1.0),
    ],
)
def test_scores(answer, reference, exact, inside, f1):
    assert exact_match(answer, reference) is exact
    assert contains(answer, reference) is inside
    assert token_f1(answer, reference) == pytest.approx(f1)


def test_greedy_answers_are_what_inference_answers(tmp_path, smollm2_dir):
    """Prompts taken from the prepared samples, four to a left-padded batch, give the replies
    `generate_reply` gives to the same questions asked one by one through the chat template."""
    rows = (SAMPLES / "quickstart_heldout.jsonl").read_text().splitlines()[::16]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(line + "\n" for line in rows))
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(smollm2_dir),
                "datasets": [{"path": str(data), "type": "chat_template"}],
                "dataset_prepared_path": str(tmp_path / "prepared"),
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    from finetune.config import load_config

    config = run_config(load_config(config_path), tmp_path / "out")
    model, tokenizer = load_for_inference(smollm2_dir, dtype=torch.float32)
    stop_ids = end_of_turn_ids(model, tokenizer)
    samples = eval_samples(held_out_data(config, data, log=lambda m: None).rows, stop_ids)
    answers = greedy_answers(model, tokenizer, samples, stop_ids, batch_size=4, max_new_tokens=40)
    questions = [json.loads(row)["messages"][:1] for row in rows]
    expected = [generate_reply(model, tokenizer, q, max_new_tokens=40) for q in questions]
    assert answers == expected
    assert len({*answers}) == 4  # four different questions, four different replies
