"""Each held-out sample's prompt is exactly the text the chat template writes for the question
(with the generation prompt), and its reference is exactly the assistant's answer; --data and
--type read other files the way training reads its datasets."""

from __future__ import annotations

import json

import pytest

from finetune.errors import EvaluationError
from finetune.evaluate.samples import eval_samples, held_out_data
from finetune.runfolder import run_config

QUIET = {"log": lambda message: None}


def test_prompt_and_reference_are_the_chat_templates_question_and_the_answer(
    tiny_run, smollm2_tokenizer
):
    config = run_config(tiny_run.loaded(), tiny_run.run_dir)
    held = held_out_data(config, tiny_run.heldout, **QUIET)
    stop = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    samples = eval_samples(held.rows, [stop, smollm2_tokenizer.eos_token_id])
    rows = [json.loads(line) for line in tiny_run.heldout.read_text().splitlines()]
    assert len(samples) == len(rows) == 8
    for sample, row in zip(samples, rows, strict=True):
        question, answer = row["messages"]
        expected_prompt = smollm2_tokenizer.apply_chat_template(
            [question], add_generation_prompt=True, tokenize=False
        )
        assert smollm2_tokenizer.decode(sample.prompt_ids) == expected_prompt
        assert smollm2_tokenizer.decode(sample.answer_ids) == answer["content"]
    assert held.source == f"{tiny_run.heldout} (chat_template)"


def test_max_samples_takes_the_first_rows_in_file_order(tiny_run):
    config = run_config(tiny_run.loaded(), tiny_run.run_dir)
    rows = held_out_data(config, tiny_run.heldout, **QUIET).rows
    assert [s.input_ids for s in eval_samples(rows, [2], max_samples=3)] == rows["input_ids"][:3]


def test_data_of_another_type(tiny_run, tmp_path, smollm2_tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"instruction": "Name a colour.", "output": "Blue."}) + "\n")
    config = run_config(tiny_run.loaded(), tiny_run.run_dir)
    held = held_out_data(config, path, "alpaca", **QUIET)
    (sample,) = eval_samples(held.rows, [smollm2_tokenizer.eos_token_id])
    assert smollm2_tokenizer.decode(sample.prompt_ids).endswith("### Response:\n")
    assert smollm2_tokenizer.decode(sample.answer_ids) == "Blue."


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"data": "no/such/file.jsonl"}, "--data no/such/file.jsonl: no such file"),
        ({"data_type": "alpaca"}, "--type goes with --data FILE"),
        ({"data": "HELDOUT", "data_type": "sharegpt"}, "--type sharegpt: type sharegpt is not"),
    ],
)
def test_wrong_data_arguments_say_what_to_do(tiny_run, arguments, message):
    config = run_config(tiny_run.loaded(), tiny_run.run_dir)
    if arguments.get("data") == "HELDOUT":
        arguments = {**arguments, "data": tiny_run.heldout}
    with pytest.raises(EvaluationError, match=message.replace("(", r"\(")):
        held_out_data(config, **arguments, **QUIET)


def test_a_run_without_held_out_data_asks_for_a_file(tiny_run):
    config = run_config(tiny_run.loaded("--val-set-size", "0"), tiny_run.run_dir)
    with pytest.raises(EvaluationError, match="give a file of held-out rows: finetune eval"):
        held_out_data(config, **QUIET)
