"""Golden tests for every shipped chat template: the exact text of a multi-turn conversation
with a system turn, and the exact characters trained (each answer, then its end-of-turn
marker). The expected texts are the model families' own formats, written out; each template
renders them as that family's own template does (checked against the official templates,
conversations without tools), with the differences its file states (mistral_v7_tekken adds no
dated default system prompt)."""

from __future__ import annotations

import pytest

from finetune.config import FinetuneConfig
from finetune.config.vocabulary import CHAT_TEMPLATE_ALIASES, CHAT_TEMPLATES
from finetune.data import chat_templates
from finetune.data.strategies import Context
from finetune.data.strategies.chat_template import render

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\nFour."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\nSix."},
    ]
}
# The family's BOS and EOS tokens, as its tokenizer gives them to the template.
SPECIAL_TOKENS = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral_v2v3": ("<s>", "</s>"),
    "mistral_v3_tekken": ("<s>", "</s>"),
    "mistral_v7_tekken": ("<s>", "</s>"),
    "gemma": ("<bos>", "<eos>"),
    "gemma3": ("<bos>", "<eos>"),
    "phi_3": ("<s>", "<|endoftext|>"),
    "phi_4": ("<|endoftext|>", "<|im_end|>"),
}

# template: (rendered text, trained pieces in order)
GOLDEN = {
    "chatml": (
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>"
            "\n<|im_start|>assistant\n<think>\nadd\n</think>\n\nFour.<|im_end|>\n"
            "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\nadd again\n"
            "</think>\n\nSix.<|im_end|>\n"
        ),
        [
            "<think>\nadd\n</think>\n\nFour.",
            "<|im_end|>",
            "<think>\nadd again\n</think>\n\nSix.",
            "<|im_end|>",
        ],
    ),
    "gemma": (
        (
            "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
            "<start_of_turn>model\n<think>\nadd\n</think>\n\nFour.<end_of_turn>\n"
            "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n<think>\n"
            "add again\n</think>\n\nSix.<end_of_turn>\n"
        ),
        [
            "<think>\nadd\n</think>\n\nFour.",
            "<end_of_turn>",
            "<think>\nadd again\n</think>\n\nSix.",
            "<end_of_turn>",
        ],
    ),
    "gemma3": (
        (
            "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
            "<start_of_turn>model\n<think>\nadd\n</think>\n\nFour.<end_of_turn>\n"
            "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n<think>\n"
            "add again\n</think>\n\nSix.<end_of_turn>\n"
        ),
        [
            "<think>\nadd\n</think>\n\nFour.",
            "<end_of_turn>",
            "<think>\nadd again\n</think>\n\nSix.",
            "<end_of_turn>",
        ],
    ),
    "llama3": (
        (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\nadd\n</think>\n\n"
            "Four.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\nadd again\n</think>\n\n"
            "Six.<|eot_id|>"
        ),
        [
            "<think>\nadd\n</think>\n\nFour.",
            "<|eot_id|>",
            "<think>\nadd again\n</think>\n\nSix.",
            "<|eot_id|>",
        ],
    ),
    "llama3_1": (
        (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
            "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            "What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\n"
            "add\n</think>\n\nFour.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            "And 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\n"
            "add again\n</think>\n\nSix.<|eot_id|>"
        ),
        [
            "<think>\nadd\n</think>\n\nFour.",
            "<|eot_id|>",
            "<think>\nadd again\n</think>\n\nSix.",
            "<|eot_id|>",
        ],
    ),
    "mistral_v2v3": (
        (
            "<s>[INST] What is 2+2?[/INST] <think>\nadd\n</think>\n\nFour.</s>"
            "[INST] And 3+3?[/INST] <think>\nadd again\n</think>\n\nSix.</s>"
        ),
        ["<think>\nadd\n</think>\n\nFour.", "</s>", "<think>\nadd again\n</think>\n\nSix.", "</s>"],
    ),
    "mistral_v3_tekken": (
        (
            "<s>[INST]What is 2+2?[/INST]<think>\nadd\n</think>\n\nFour.</s>"
            "[INST]And 3+3?[/INST]<think>\nadd again\n</think>\n\nSix.</s>"
        ),
        ["<think>\nadd\n</think>\n\nFour.", "</s>", "<think>\nadd again\n</think>\n\nSix.", "</s>"],
    ),
    "mistral_v7_tekken": (
        (
            "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]What is 2+2?[/INST]<think>\nadd\n"
            "</think>\n\nFour.</s>[INST]And 3+3?[/INST]<think>\nadd again\n</think>\n\nSix.</s>"
        ),
        ["<think>\nadd\n</think>\n\nFour.", "</s>", "<think>\nadd again\n</think>\n\nSix.", "</s>"],
    ),
    "phi_3": (
        (
            "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"
            "<think>\nadd\n</think>\n\nFour.<|end|>\n<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n"
            "<think>\nadd again\n</think>\n\nSix.<|end|>\n<|endoftext|>"
        ),
        [
            "<think>\nadd\n</think>\n\nFour.",
            "<|end|>",
            "<think>\nadd again\n</think>\n\nSix.",
            "<|end|>",
        ],
    ),
    "phi_4": (
        (
            "<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
            "<|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
            "<|im_start|>assistant<|im_sep|><think>\nadd\n</think>\n\nFour.<|im_end|>"
            "<|im_start|>user<|im_sep|>And 3+3?<|im_end|>"
            "<|im_start|>assistant<|im_sep|><think>\nadd again\n</think>\n\nSix.<|im_end|>"
        ),
        [
            "<think>\nadd\n</think>\n\nFour.",
            "<|im_end|>",
            "<think>\nadd again\n</think>\n\nSix.",
            "<|im_end|>",
        ],
    ),
    "qwen3": (
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>"
            "\n<|im_start|>assistant\nFour.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nadd again\n</think>\n\nSix.<|im_end|>\n"
        ),
        ["Four.", "<|im_end|>", "<think>\nadd again\n</think>\n\nSix.", "<|im_end|>"],
    ),
    "qwen_25": (
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>"
            "\n<|im_start|>assistant\n<think>\nadd\n</think>\n\nFour.<|im_end|>\n"
            "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\nadd again\n"
            "</think>\n\nSix.<|im_end|>\n"
        ),
        [
            "<think>\nadd\n</think>\n\nFour.",
            "<|im_end|>",
            "<think>\nadd again\n</think>\n\nSix.",
            "<|im_end|>",
        ],
    ),
}


class FamilyTokens:
    """What a template reads from a tokenizer: its BOS and EOS tokens."""

    def __init__(self, name: str):
        self.bos_token, self.eos_token = SPECIAL_TOKENS.get(name, ("", "<|im_end|>"))


def rendered(name: str, row: dict = CONVERSATION, **dataset_options):
    tokens = FamilyTokens(name)
    template = chat_templates.resolve_chat_template(name, None, tokens)
    config = FinetuneConfig(
        base_model="x", datasets=[{"path": "d", "type": "chat_template", **dataset_options}]
    )
    marker = chat_templates.end_of_turn_marker(template, tokens)
    ctx = Context(config.datasets[0], config, tokens, template, end_of_turn=(marker,))
    return render(row, ctx)


def test_every_shipped_template_has_a_golden_case():
    assert set(GOLDEN) == set(chat_templates.BUILTIN_TEMPLATES)
    assert set(CHAT_TEMPLATES) == {"tokenizer_default", *chat_templates.BUILTIN_TEMPLATES}
    assert set(CHAT_TEMPLATE_ALIASES.values()) <= set(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_template_text_and_trained_characters(name):
    result = rendered(name)
    text, trained = GOLDEN[name]
    assert result.text == text
    assert [result.text[a:b] for a, b in result.spans] == trained
    assert (result.answers, result.stopped) == (2, 2)  # both answers end with a trained stop


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_generation_prompt_is_where_training_answers_start(name):
    """At inference the model continues the generation prompt; training taught it to write
    exactly what follows that prompt in the training text."""
    tokens = FamilyTokens(name)
    template = chat_templates.resolve_chat_template(name, None, tokens)
    first_turn = CONVERSATION["messages"][1:3]
    prompt = chat_templates.render(template, first_turn[:1], tokens, generation_prompt=True)
    result = rendered(name, {"messages": first_turn})
    start = result.spans[0][0]
    assert result.text[:start].rstrip(" ") == prompt.rstrip(" ")


def test_qwen3_keeps_reasoning_only_after_the_last_question_and_trains_it():
    result = rendered("qwen3")
    assert "add\n</think>" not in result.text  # the first answer's reasoning is gone
    assert "<think>\nadd again\n</think>\n\nSix." in [result.text[a:b] for a, b in result.spans]


def test_reasoning_from_its_own_field_and_from_split_thinking():
    row = {
        "messages": [
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A.", "reasoning_content": "think hard"},
        ]
    }
    assert "<think>\nthink hard\n</think>\n\nA." in rendered("qwen3", row).text
    mixed = {
        "messages": [
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "<reasoning>why</reasoning>A."},
        ]
    }
    assert "<think>\nwhy\n</think>\n\nA." in rendered("qwen3", mixed, split_thinking=True).text


def test_mistral_moves_the_system_message_and_masks_stay_exact():
    """Mistral's template puts the system message before the last user turn only: it is absent
    from a conversation that ends with an answer, and present in one that ends with a question."""
    assert "Be brief." not in rendered("mistral_v2v3").text
    asking = {"messages": CONVERSATION["messages"][:4]}
    assert "[INST] Be brief.\n\nAnd 3+3?[/INST]" in rendered("mistral_v2v3", asking).text
