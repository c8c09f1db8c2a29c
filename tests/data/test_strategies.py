"""Golden tests: the exact rendered text and the exact label mask of every prompt strategy,
with SmolLM2's real tokenizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from finetune.config import FinetuneConfig
from finetune.data import chat_templates
from finetune.data.strategies import Context, RowError, strategy_for
from finetune.data.tokenize import IGNORE_INDEX, tokenize_rendered

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)
ALPACA_SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)


def make_config(dataset: dict, **options) -> FinetuneConfig:
    return FinetuneConfig(base_model="x", datasets=[dataset], **options)


def run(row: dict, tokenizer, dataset: dict, template: str | None = None, **options):
    """Render and tokenize one row; returns (full decoded text, trained runs as text, sample)."""
    config = make_config(dataset, **options)
    ds = config.datasets[0]
    text = None
    if template:
        text = chat_templates.resolve_chat_template(template, None, tokenizer)
    ctx = Context(
        dataset=ds,
        config=config,
        tokenizer=tokenizer,
        chat_template=text,
        end_of_turn=chat_templates.end_of_turn_marker(text, tokenizer) if text else None,
    )
    rendered = strategy_for(ds).render(row, ctx)
    sample = tokenize_rendered([rendered], tokenizer)[0]
    return rendered, trained_runs(sample, tokenizer), sample


def trained_runs(sample, tokenizer) -> list[str]:
    """The trained tokens, decoded as contiguous runs: the label mask a person can read."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(int(token))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def prompt_response_reference(prompt: str, response: str, tokenizer):
    """The independent reference for prompt/response strategies: the prompt's own tokens all
    masked, the response's own tokens and EOS trained (valid where the two tokenize apart)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(prompt + response, add_special_tokens=True)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids, "prompt and response merge here"
    eos = tokenizer.eos_token_id
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :] + [eos]
    return full_ids + [eos], labels


ALPACA_ROW = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}
ALPACA_ROW_NO_INPUT = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


@pytest.mark.parametrize(
    ("row", "prompt"),
    [
        (
            ALPACA_ROW,
            ALPACA_SYSTEM + "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
            "### Response:\n",
        ),
        (
            ALPACA_ROW_NO_INPUT,
            ALPACA_SYSTEM_NO_INPUT + "### Instruction:\nName a colour.\n\n### Response:\n",
        ),
    ],
    ids=["with_input", "without_input"],
)
def test_alpaca_text_and_mask(smollm2_tokenizer, row, prompt):
    rendered, runs, sample = run(row, smollm2_tokenizer, {"path": "x", "type": "alpaca"})
    assert rendered.text == prompt + row["output"]
    ids, labels = prompt_response_reference(prompt, row["output"], smollm2_tokenizer)
    assert sample.input_ids.tolist() == ids
    assert sample.labels.tolist() == labels
    assert runs == [row["output"] + "<|im_end|>"]


def test_alpaca_train_on_inputs_trains_everything_but_the_first_token(smollm2_tokenizer):
    _, _, sample = run(
        ALPACA_ROW, smollm2_tokenizer, {"path": "x", "type": "alpaca"}, train_on_inputs=True
    )
    assert sample.labels[0] == IGNORE_INDEX
    assert sample.labels[1:].tolist() == sample.input_ids[1:].tolist()


def test_alpaca_chatml_text(smollm2_tokenizer):
    rendered, runs, _ = run(ALPACA_ROW, smollm2_tokenizer, {"path": "x", "type": "alpaca:chatml"})
    assert rendered.text == (
        "<|im_start|>system\n" + ALPACA_SYSTEM.strip() + "<|im_end|>\n"
        "<|im_start|>user\nAdd the numbers.\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
        "The sum is 5."
    )
    assert runs == ["The sum is 5.<|im_end|>"]


def test_alpaca_chat_text(smollm2_tokenizer):
    rendered, runs, _ = run(ALPACA_ROW, smollm2_tokenizer, {"path": "x", "type": "alpaca_chat"})
    assert rendered.text == (
        "SYSTEM: " + ALPACA_SYSTEM.strip() + "\nUSER: Add the numbers.\n2 and 3\nASSISTANT:"
        "The sum is 5."
    )
    assert runs == ["The sum is 5.<|im_end|>"]


def test_load_qa_text_and_mask(smollm2_tokenizer):
    row = {"question": "How many legs does a spider have?", "answer": " Eight."}
    rendered, runs, sample = run(
        row, smollm2_tokenizer, {"path": "x", "type": "alpaca_chat.load_qa"}
    )
    prompt = (
        "SYSTEM: Below is an instruction from a USER that describes a task. The ASSISTANT writes "
        "a response that appropriately and concisely completes the request.\n\n\n"
        "USER: How many legs does a spider have?\nASSISTANT:"
    )
    assert rendered.text == prompt + " Eight."
    ids, labels = prompt_response_reference(prompt, " Eight.", smollm2_tokenizer)
    assert (sample.input_ids.tolist(), sample.labels.tolist()) == (ids, labels)
    assert runs == [" Eight.<|im_end|>"]


def test_user_defined_format(smollm2_tokenizer):
    dataset = {
        "path": "x",
        "type": {
            "field_instruction": "task",
            "field_input": "word",
            "field_output": "result",
            "format": "[TASK] {instruction} [WORD] {input} [ANSWER] ",
            "no_input_format": "[TASK] {instruction} [ANSWER] ",
            "system_prompt": "Be exact.",
            "system_format": "<<{system}>>\n",
        },
    }
    row = {"task": "Reverse it.", "word": "stressed", "result": "desserts"}
    rendered, runs, _ = run(row, smollm2_tokenizer, dataset)
    assert rendered.text == "<<Be exact.>>\n[TASK] Reverse it. [WORD] stressed [ANSWER] desserts"
    # The format's trailing space merges into the answer's first token, which is trained.
    assert runs == [" desserts<|im_end|>"]
    rendered, _, _ = run({"task": "Say hi.", "result": "hi"}, smollm2_tokenizer, dataset)
    assert rendered.text == "<<Be exact.>>\n[TASK] Say hi. [ANSWER] hi"


def test_completion_trains_every_token(smollm2_tokenizer):
    text = "The harbor town of Vell sits where the river meets the sea."
    rendered, _, sample = run(
        {"text": text}, smollm2_tokenizer, {"path": "x", "type": "completion"}
    )
    assert rendered.text == text
    expected = smollm2_tokenizer(text)["input_ids"] + [smollm2_tokenizer.eos_token_id]
    assert sample.input_ids.tolist() == expected
    assert sample.labels.tolist() == [IGNORE_INDEX] + expected[1:]


def test_input_output_trains_only_labelled_segments(smollm2_tokenizer):
    row = {
        "segments": [
            {"label": False, "text": "Q: Name a planet.\nA:"},
            {"label": True, "text": " Mars."},
            {"label": False, "text": "\nQ: Another?\nA:"},
            {"label": True, "text": " Venus."},
        ]
    }
    rendered, runs, sample = run(row, smollm2_tokenizer, {"path": "x", "type": "input_output"})
    assert rendered.text == "Q: Name a planet.\nA: Mars.\nQ: Another?\nA: Venus."
    assert runs == [" Mars.", " Venus."]
    assert sample.input_ids.tolist() == smollm2_tokenizer(rendered.text)["input_ids"]


# --- chat templates -------------------------------------------------------------------------

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}
CHAT = {"path": "x", "type": "chat_template"}

CHATML_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
    "<|im_start|>assistant\nParis.<|im_end|>\n"
)
LLAMA3_TEXT = (
    "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
)


@pytest.fixture(scope="module")
def llama3_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer with Llama-3's turn tokens added, as `tokens:` would add them."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    markers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return tokenizer


@pytest.mark.parametrize(
    ("template", "text", "eot"),
    [("tokenizer_default", CHATML_TEXT, "<|im_end|>"), ("llama3", LLAMA3_TEXT, "<|eot_id|>")],
)
def test_chat_template_multi_turn(smollm2_tokenizer, llama3_tokenizer, template, text, eot):
    tokenizer = llama3_tokenizer if template == "llama3" else smollm2_tokenizer
    rendered, runs, sample = run(CONVERSATION, tokenizer, CHAT, template)
    assert rendered.text == text
    assert tokenizer.decode(sample.input_ids) == text
    assert runs == [f"Hello.{eot}", f"Paris.{eot}"]


@pytest.mark.parametrize(
    ("train_on_eos", "expected"),
    [
        ("turn", ["Hello.<|im_end|>", "Paris.<|im_end|>"]),
        ("none", ["Hello.", "Paris."]),
        ("last", ["Hello.", "Paris.<|im_end|>"]),
        (
            "all",
            ["<|im_end|>", "<|im_end|>", "Hello.<|im_end|>", "<|im_end|>", "Paris.<|im_end|>"],
        ),
    ],
)
def test_train_on_eos_modes(smollm2_tokenizer, train_on_eos, expected):
    dataset = {**CHAT, "train_on_eos": train_on_eos}
    _, runs, _ = run(CONVERSATION, smollm2_tokenizer, dataset, "chatml")
    assert runs == expected


def test_roles_to_train_and_per_message_flag(smollm2_tokenizer):
    dataset = {**CHAT, "roles_to_train": ["user", "assistant"]}
    _, runs, _ = run(CONVERSATION, smollm2_tokenizer, dataset, "chatml")
    assert runs == [
        "Hi!<|im_end|>",
        "Hello.<|im_end|>",
        "Capital of France?<|im_end|>",
        "Paris.<|im_end|>",
    ]
    flagged = {"messages": [dict(m) for m in CONVERSATION["messages"]]}
    flagged["messages"][2]["training"] = False  # skip the first assistant answer
    flagged["messages"][0]["training"] = True  # and train the system prompt
    _, runs, _ = run(flagged, smollm2_tokenizer, CHAT, "chatml")
    assert runs == ["Be brief.<|im_end|>", "Paris.<|im_end|>"]


def test_sharegpt_mappings_and_role_aliases(smollm2_tokenizer):
    row = {
        "conversations": [
            {"from": "human", "value": "Name a fruit."},
            {"from": "gpt", "value": "A banana."},
            {"from": "bot", "value": "Anything else?"},
        ]
    }
    dataset = {
        **CHAT,
        "field_messages": "conversations",
        "message_property_mappings": {"role": "from", "content": "value"},
        "roles": {"assistant": ["bot"]},
    }
    rendered, runs, _ = run(row, smollm2_tokenizer, dataset, "chatml")
    assert rendered.text.startswith("<|im_start|>user\nName a fruit.<|im_end|>\n")
    assert runs == ["A banana.<|im_end|>", "Anything else?<|im_end|>"]


def test_content_equal_to_the_role_name_is_located_exactly(smollm2_tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "user"},
            {"role": "assistant", "content": "assistant"},
        ]
    }
    _, runs, _ = run(row, smollm2_tokenizer, CHAT, "chatml")
    assert runs == ["assistant<|im_end|>"]


def test_unknown_role_is_a_row_error(smollm2_tokenizer):
    row = {"messages": [{"role": "narrator", "content": "Once"}]}
    with pytest.raises(RowError, match="unknown role 'narrator'"):
        run(row, smollm2_tokenizer, CHAT, "chatml")


def test_missing_message_keys_suggest_mappings(smollm2_tokenizer):
    row = {"messages": [{"from": "human", "value": "hi"}]}
    with pytest.raises(RowError, match="found: from, value.*message_property_mappings"):
        run(row, smollm2_tokenizer, CHAT, "chatml")


def test_tokenizer_default_without_template_is_an_error(smollm2_tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(chat_templates.ChatTemplateError, match="has no chat template"):
        chat_templates.resolve_chat_template("tokenizer_default", None, NoTemplate())


@pytest.mark.parametrize("name", chat_templates.BUILTIN_TEMPLATES)
def test_every_builtin_template_masks_only_assistant_content(smollm2_tokenizer, name):
    _, runs, sample = run(CONVERSATION, smollm2_tokenizer, CHAT, name)
    joined = "".join(runs)
    assert "Hello." in joined and "Paris." in joined
    assert "Hi!" not in joined and "Capital" not in joined and "brief" not in joined
    assert np.count_nonzero(sample.labels != IGNORE_INDEX) < len(sample.labels) / 2
