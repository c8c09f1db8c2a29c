"""The stop-token audit: every trained answer ends with a trained token the model emits to stop
at inference, or preprocess says why not and how to fix it. No EOS twice, and a pad token equal
to EOS never masks the real one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.data.chat_templates import BUILTIN_TEMPLATES
from finetune.data.packing import collate_padded
from finetune.data.prepare import prepare_datasets
from finetune.data.tokenize import IGNORE_INDEX
from finetune.errors import DataRowError

SAMPLES = Path(__file__).parents[2] / "data" / "samples"
QUIET = {"log": lambda message: None}
NO_TERMINATOR = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def config(tmp_path: Path, datasets: list[dict], **options) -> FinetuneConfig:
    return FinetuneConfig(
        base_model="x",
        datasets=datasets,
        dataset_prepared_path=str(tmp_path / "prepared"),
        **options,
    )


CHAT = [{"path": str(SAMPLES / "chat.jsonl"), "type": "chat_template"}]


def test_a_template_without_terminator_is_refused_with_the_fix(tmp_path, smollm2_tokenizer):
    with pytest.raises(DataRowError) as caught:
        prepare_datasets(
            config(tmp_path, CHAT, chat_template_jinja=NO_TERMINATOR), smollm2_tokenizer, **QUIET
        )
    message = str(caught.value)
    assert "datasets[0]" in message and "chat.jsonl" in message
    assert "no answer ends with a trained stop token" in message
    assert "eot_tokens" in message and "train_on_eos" in message


def test_eot_tokens_name_the_terminator_of_a_custom_template(tmp_path, smollm2_tokenizer):
    template = NO_TERMINATOR.replace("'\\n'", "'<|im_end|>\\n'")
    prepared = prepare_datasets(
        config(tmp_path, CHAT, chat_template_jinja=template, eot_tokens=["<|im_end|>"]),
        smollm2_tokenizer,
        **QUIET,
    )
    assert prepared.summary["answers_with_stop"] == prepared.summary["answers"] > 0


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_every_shipped_template_trains_every_stop(tmp_path, smollm2_tokenizer, name):
    prepared = prepare_datasets(
        config(tmp_path, CHAT, chat_template=name), smollm2_tokenizer, **QUIET
    )
    summary = prepared.summary
    # chat.jsonl: every conversation ends with an answer and alternates user / assistant
    assert summary["answers"] > 0
    assert summary["answers_with_stop"] == summary["answers"]


def test_preprocess_summary_counts_the_stops(tmp_path, smollm2_tokenizer):
    from finetune.data.summary import format_summary

    prepared = prepare_datasets(
        config(tmp_path, CHAT, chat_template="chatml"), smollm2_tokenizer, **QUIET
    )
    answers = prepared.summary["answers"]
    assert f"trained stop tokens: {answers:,} of {answers:,} answers" in format_summary(
        prepared.summary
    )


def test_eos_is_not_doubled_when_the_tokenizer_adds_it(tmp_path, smollm2_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tokenizer.eos_token_id)]
    )
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "Name a colour.", "output": "Blue."}) + "\n" * 2)
    prepared = prepare_datasets(
        config(tmp_path, [{"path": str(data), "type": "alpaca"}]), tokenizer, **QUIET
    )
    ids, labels = prepared.train[0]["input_ids"], prepared.train[0]["labels"]
    assert ids[-1] == tokenizer.eos_token_id and ids[-2] != tokenizer.eos_token_id
    assert labels[-1] == tokenizer.eos_token_id  # trained, once


def test_a_pad_token_equal_to_eos_never_masks_the_real_eos(tmp_path, smollm2_tokenizer):
    assert smollm2_tokenizer.pad_token_id == smollm2_tokenizer.eos_token_id  # as many models have
    data = tmp_path / "rows.jsonl"
    data.write_text(
        json.dumps({"instruction": "Name a colour.", "output": "Blue."})
        + "\n"
        + json.dumps({"instruction": "Name a much longer thing, please.", "output": "A river."})
        + "\n"
    )
    prepared = prepare_datasets(
        config(tmp_path, [{"path": str(data), "type": "alpaca"}]), smollm2_tokenizer, **QUIET
    )
    samples = [prepared.train[i] for i in range(2)]
    batch = collate_padded(samples, smollm2_tokenizer.pad_token_id)
    eos = smollm2_tokenizer.eos_token_id
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        assert batch["labels"][row, n - 1] == eos  # the real EOS is trained...
        assert torch.all(batch["labels"][row, n:] == IGNORE_INDEX)  # ...the padding is not
