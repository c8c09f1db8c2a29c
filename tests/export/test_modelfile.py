"""`--format ollama`: the Modelfile's TEMPLATE, rendered as Ollama's Go runtime renders it
(tests/export/gotemplate.py, written from the Go documentation), writes every prompt of a
training conversation byte for byte as training did, and its stop parameter is the token that
ended the trained answers.

Chat runs: for every assistant turn, the conversation before it (ending with a user message) is
the runtime's prompt; it must equal the training template's own prompt for it, and the training
text must go on from there with the answer and the stop token. Alpaca-style runs: the prompt of
an instruction must equal the strategy's rendered prompt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import pytest
from export_runs import ALPACA_CASES, CONVERSATIONS, CUSTOM, SAMPLES, template_text, variant_run
from gotemplate import render as render_go
from transformers import AutoTokenizer

from finetune.data import chat_templates
from finetune.data.strategies import Context, strategy_for
from finetune.errors import ExportError
from finetune.export import export_model

MODELFILE = re.compile(r'^TEMPLATE """(.*?)"""$', re.DOTALL | re.MULTILINE)


def quiet(_message: str) -> None:
    pass


def read_modelfile(path: Path) -> tuple[str, list[str], str | None, str]:
    text = path.read_text(encoding="utf-8")
    stops = [json.loads(line.split(" ", 2)[2]) for line in text.splitlines() if "stop" in line]
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.DOTALL | re.MULTILINE)
    source = re.search(r"^FROM (.+)$", text, re.MULTILINE).group(1)
    return MODELFILE.search(text).group(1), stops, system and system.group(1), source


def as_ollama(messages: list[dict], system: str | None) -> dict:
    """Ollama's request: its Modelfile SYSTEM goes first when the conversation has none."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}


def export_ollama(config, folder: Path) -> tuple[str, list[str], str | None, str]:
    report = export_model(config, folder, fmt="ollama", log=quiet)
    assert report.modelfile == report.gguf_file.parent / "Modelfile"
    return read_modelfile(report.modelfile)


def training_text(config, tokenizer, row: dict) -> str:
    context = Context(
        dataset=config.datasets[0],
        config=config,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        end_of_turn=chat_templates.end_of_turn_marker(tokenizer.chat_template, tokenizer)
        if tokenizer.chat_template
        else None,
    )
    return strategy_for(config.datasets[0]).render(row, context).text


CHAT_CASES = [("qwen2", name) for name in chat_templates.BUILTIN_TEMPLATES] + [
    ("gemma3", "gemma3"),
    ("mistral", "mistral_v2v3"),
    ("llama", None),  # SmolLM2's own template: the quickstart
]


@pytest.mark.parametrize("family, template", CHAT_CASES, ids=lambda value: str(value))
def test_modelfile_template_writes_training_prompts(family, template, run_of, tmp_path):
    run = run_of(family)
    text = template_text(template) if template else None
    config = variant_run(run.folder, tmp_path / "run", chat_template=text)
    go_template, stops, _, source = export_ollama(config, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    chat = tokenizer.chat_template
    stop = chat_templates.end_of_turn_marker(chat, tokenizer)

    assert source == f"./{(tmp_path / 'run').name}-f16.gguf"
    assert stops[0] == stop
    prompts = 0
    for row in CONVERSATIONS:
        messages = row["messages"]
        trained = training_text(config, tokenizer, row)
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            history = messages[:k]
            expected = chat_templates.render(chat, history, tokenizer, True)
            assert render_go(go_template, as_ollama(history, None)) == expected
            prompts += 1
            if history[0]["role"] == "system" and folds_system(chat, tokenizer) == "last":
                continue  # Mistral's template moves the system message to the last user turn
            assert trained.startswith(expected)
            after = trained[len(expected) :]
            answer = after.find(message["content"].strip() + stop)
            # Before the answer: nothing but spaces, or the empty think block Qwen3 gives the
            # last answer (which the model itself writes at run time).
            assert answer >= 0
            assert not re.sub(r"<think>\s*</think>", "", after[:answer]).strip()
    assert prompts >= 4


def folds_system(template: str, tokenizer) -> str:
    from finetune.export.chat_format import from_chat_template

    turns = from_chat_template(template, tokenizer)
    return turns.system_into if turns.system_join is not None else ""


def test_default_system_message_becomes_system(run_of, tmp_path):
    run = run_of("qwen2")
    config = variant_run(run.folder, tmp_path / "run", chat_template=template_text("chatml"))
    config = config.model_copy(update={"default_system_message": "You answer in French."})
    go_template, _, system, _ = export_ollama(config, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    question = [{"role": "user", "content": "Hello?"}]
    answer = {"role": "assistant", "content": "Bonjour."}
    trained = training_text(config, tokenizer, {"messages": [*question, answer]})

    assert system == "You answer in French."
    assert trained.startswith(render_go(go_template, as_ollama(question, system)))


@pytest.mark.parametrize("kind, data", ALPACA_CASES, ids=lambda value: str(value))
def test_modelfile_template_writes_alpaca_prompts(kind, data, run_of, tmp_path):
    run = run_of("qwen2")
    dataset_type = CUSTOM if kind == "custom" else kind
    config = variant_run(
        run.folder, tmp_path / "run", dataset_type=dataset_type, dataset_path=SAMPLES / data
    )
    go_template, stops, _, _ = export_ollama(config, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    fields = CUSTOM if kind == "custom" else {}
    instruction = fields.get("field_instruction", "question" if "qa" in kind else "instruction")
    field_input = fields.get("field_input", "input")
    output = fields.get("field_output", "answer" if "qa" in kind else "output")

    assert stops == [tokenizer.eos_token]  # training appended EOS to every answer
    checked = 0
    for line in (SAMPLES / data).read_text().splitlines():
        row = json.loads(line)
        if row.get(field_input):
            continue
        trained = training_text(config, tokenizer, row)
        prompt = trained[: len(trained) - len(row[output])]
        user = [{"role": "user", "content": row[instruction]}]
        assert render_go(go_template, as_ollama(user, None)) == prompt
        checked += 1
    assert checked >= 1


def test_a_template_of_no_fixed_turns_is_refused_for_ollama_only(run_of, tmp_path):
    """A template that numbers its turns has no fixed text per role: no Go template is
    guessed for it, while the GGUF still carries it for llama.cpp's own Jinja."""
    numbered = (
        "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}{{ messages|length + 1 }}. assistant:"
        "{% endif %}"
    )
    config = variant_run(run_of("qwen2").folder, tmp_path / "run", chat_template=numbered)
    with pytest.raises(ExportError, match="cannot be written as fixed turns"):
        export_model(config, tmp_path / "run", fmt="ollama", log=quiet)
    path = export_model(config, tmp_path / "run", log=quiet).gguf_file
    assert gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents() == numbered
