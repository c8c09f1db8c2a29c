"""Train/serve parity: `inference` gives the model exactly the prompt tokens training gave it,
for every dataset type, and the saved tokenizer's chat template reproduces the training token
ids of every conversation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from finetune.config import FinetuneConfig
from finetune.data.prepare import prepare_datasets
from finetune.data.tokenize import IGNORE_INDEX
from finetune.inference import prompt_format, prompt_inputs
from finetune.runfolder import read_record
from finetune.train import train

SAMPLES = Path(__file__).parents[1] / "data" / "samples"
QUIET = {"log": lambda message: None}
CUSTOM = {
    "field_instruction": "task",
    "field_output": "result",
    "format": "{instruction}\nWord: {input}\nAnswer: ",
    "no_input_format": "{instruction}\nAnswer: ",
}
# type: (one training row, the user's text at inference)
CASES = {
    "alpaca": ({"instruction": "Name a colour.", "input": "", "output": "Blue."}, "Name a colour."),
    "alpaca:chatml": ({"instruction": "Name a colour.", "output": "Blue."}, "Name a colour."),
    "alpaca_chat": ({"instruction": "Name a colour.", "output": "Blue."}, "Name a colour."),
    "alpaca:phi": ({"instruction": "Name a colour.", "output": "Blue."}, "Name a colour."),
    "alpaca_chat.load_qa": ({"question": "Sky colour?", "answer": "Blue."}, "Sky colour?"),
    "custom": ({"task": "Spell seven.", "result": "Seven."}, "Spell seven."),
    "input_output": (
        {"segments": [{"text": "Q: two plus two?\nA:", "label": False}, {"text": " Four."}]},
        "Q: two plus two?\nA:",
    ),
    "completion": (
        {"text": "The harbor town of Vell sits by the sea."},
        "The harbor town of Vell sits by the sea.",
    ),
}


def run(tmp_path: Path, model_dir: Path, dataset_type, rows: list[dict]) -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = FinetuneConfig(
        base_model=str(model_dir),
        datasets=[{"path": str(data), "type": dataset_type}],
        adapter="lora",
        lora_target_linear=True,
        max_steps=1,
        bf16=False,
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
    )
    train(config, **QUIET)
    return Path(config.output_dir)


@pytest.mark.parametrize("kind", list(CASES))
def test_inference_prompt_tokens_are_the_training_prompt_tokens(kind, tmp_path, tiny_model_dir):
    row, user_text = CASES[kind]
    out = run(tmp_path, tiny_model_dir, CUSTOM if kind == "custom" else kind, [row])
    config = read_record(out).resolved_config()
    tokenizer = AutoTokenizer.from_pretrained(out)  # what inference loads
    trained = prepare_datasets(config, tokenizer, **QUIET).train[0]
    first_trained = next(i for i, label in enumerate(trained["labels"]) if label != IGNORE_INDEX)
    # The prompt is what precedes the first trained token; for completion, the whole text
    # (training appended an EOS after it).
    prompt_ids = trained["input_ids"][: first_trained if kind != "completion" else -1]

    fmt = prompt_format(config, tokenizer)
    text, inputs = prompt_inputs(tokenizer, [{"role": "user", "content": user_text}], fmt)
    assert inputs["input_ids"][0].tolist() == prompt_ids, (text, kind)


def test_saved_template_reproduces_every_training_conversation(tmp_path, tiny_model_dir):
    rows = [json.loads(line) for line in (SAMPLES / "chat.jsonl").read_text().splitlines() if line]
    out = run(tmp_path, tiny_model_dir, "chat_template", rows)
    config = read_record(out).resolved_config()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prepared = prepare_datasets(
        config.model_copy(update={"shuffle_merged_datasets": False}), tokenizer, **QUIET
    )
    assert len(prepared.train) == len(rows)
    for row, sample in zip(rows, prepared.train, strict=True):
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
        assert list(ids["input_ids"]) == sample["input_ids"]


SHOWN = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    ),
    "completion": "The harbor town of Vell sits by the sea.",
    "input_output": "Q: two plus two?\nA:",
    "custom": "Spell seven.\nAnswer: ",
    # SmolLM2's own template (tokenizer_default) inserts its default system message
    "chat_template": (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("kind", list(SHOWN))
def test_show_prompt_prints_the_training_format(
    kind, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    import yaml

    from finetune.cli import main

    if kind == "chat_template":
        row = {
            "messages": [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
            ]
        }
        user_text = "Name a colour."
    else:
        row, user_text = CASES[kind]
    out = run(tmp_path, tiny_model_dir, CUSTOM if kind == "custom" else kind, [row])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(read_record(out).config))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "inference",
                str(config),
                "--prompt",
                user_text,
                "--show-prompt",
                "--max-new-tokens",
                "2",
            ]
        )
    output = capsys.readouterr()
    assert exited.value.code in (0, None), output.err
    shown = output.out.split("--- prompt (", 1)[1].split("--- reply ---")[0]
    header, text = shown.split(" tokens) ---\n", 1)
    assert text.removesuffix("\n") == SHOWN[kind]
    assert int(header) > 0
