"""The prompt format inside the GGUF tokenizes training conversations exactly as training did.

Reference: the token ids of finetune's own preprocessing (`tokenize_dataset`, what `train`
feeds the model). Exported side: the chat template read back from the file with
`gguf.GGUFReader`, rendered with the BOS/EOS the file declares, and tokenized by the tokenizer
transformers builds from the file's metadata, adding special tokens only where the file says
the runtime adds them (`tokenizer.ggml.add_bos_token`).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from export_runs import ALPACA_CASES, CONVERSATIONS, CUSTOM, SAMPLES, template_text, variant_run
from transformers import AutoTokenizer

from finetune.data import chat_templates
from finetune.data.prepare import tokenize_dataset
from finetune.export import export_model

# (family run, template): every built-in template on a byte-level vocabulary (Qwen2-like),
# sentencepiece-style vocabularies with their own families' templates, and SmolLM2 itself.
CASES = [("qwen2", name) for name in chat_templates.BUILTIN_TEMPLATES] + [
    ("gemma3", "gemma3"),
    ("gemma3", "gemma"),
    ("mistral", "mistral_v2v3"),
    ("mistral", "llama3"),
    ("llama", None),  # SmolLM2's own template (the quickstart's tokenizer_default)
]


def quiet(_message: str) -> None:
    pass


def exported(config, folder: Path):
    """The GGUF's chat template, and the tokenizer transformers builds from the file."""
    path = export_model(config, folder, log=quiet).gguf_file
    fields = gguf.GGUFReader(path).fields
    template = fields["tokenizer.chat_template"].contents()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return fields, template, tokenizer


def training_ids(config, folder: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    samples, _ = tokenize_dataset(
        config.datasets[0], config, tokenizer, tokenizer.chat_template, "datasets[0]", quiet
    )
    return [sample.input_ids.tolist() for sample in samples]


@pytest.mark.parametrize("family, template", CASES, ids=lambda value: str(value))
def test_chat_template_in_gguf_gives_training_tokens(family, template, run_of, tmp_path):
    run = run_of(family)
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONS))
    text = template_text(template) if template else None
    config = variant_run(run.folder, tmp_path / "run", chat_template=text, dataset_path=data)
    fields, gguf_template, tokenizer = exported(config, tmp_path / "run")
    run_template = AutoTokenizer.from_pretrained(tmp_path / "run").chat_template

    assert gguf_template == run_template  # the exact template the run trained with
    stop = chat_templates.end_of_turn_marker(run_template, tokenizer)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens[fields["tokenizer.ggml.eot_token_id"].contents()] == stop
    # EOS is the end-of-turn token too, unless the template writes the tokenizer's EOS itself
    # (Phi-3 ends a finished conversation with it): then that stays EOS.
    assert tokenizer.eos_token == stop or (
        tokenizer.eos_token == run.tokenizer.eos_token and "eos_token" in run_template
    )
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # the template writes it
    expected = training_ids(config, tmp_path / "run")
    for row, ids in zip(CONVERSATIONS, expected, strict=True):
        rendered = chat_templates.render(gguf_template, row["messages"], tokenizer, False)
        assert tokenizer(rendered)["input_ids"] == ids


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
@pytest.mark.parametrize("kind, data", ALPACA_CASES, ids=lambda value: str(value))
def test_alpaca_prompt_in_gguf_gives_training_tokens(family, kind, data, run_of, tmp_path):
    """Alpaca-style runs trained without a chat template: the GGUF gets one that writes the
    prompt as the strategy did (rows with an `input` have no chat form and are left out)."""
    run = run_of(family)
    dataset_type = CUSTOM if kind == "custom" else kind
    config = variant_run(
        run.folder, tmp_path / "run", dataset_type=dataset_type, dataset_path=SAMPLES / data
    )
    _, gguf_template, tokenizer = exported(config, tmp_path / "run")
    fields = CUSTOM if kind == "custom" else {}
    instruction = fields.get("field_instruction", "question" if "qa" in kind else "instruction")
    field_input = fields.get("field_input", "input")
    output = fields.get("field_output", "answer" if "qa" in kind else "output")
    rows = [json.loads(line) for line in (SAMPLES / data).read_text().splitlines()]
    checked = 0
    for row, ids in zip(rows, training_ids(config, tmp_path / "run"), strict=True):
        if row.get(field_input):
            continue
        messages = [
            {"role": "user", "content": row[instruction]},
            {"role": "assistant", "content": row[output]},
        ]
        rendered = chat_templates.render(gguf_template, messages, tokenizer, False)
        assert tokenizer(rendered)["input_ids"] == ids
        checked += 1
    assert checked >= 1
