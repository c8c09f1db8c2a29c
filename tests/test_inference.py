"""Generation and chat with the embedded SmolLM2-135M-Instruct, alone and with a LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.errors import ModelLoadError
from finetune.inference import chat_loop, generate_reply, load_for_inference
from finetune.model.default_model import default_model_path, ensure_default_model

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
# This 135M model forgets a name ("My name is Ada." / "What is my name?" gets "My name is
# Elena"), but repeats a secret word given in an earlier turn, and does not guess it without.
SECRET = "The secret word is Ada."
ASK_SECRET = "What is the secret word?"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """The embedded model: the user's converted copy if there is one, else one for this session
    (shared with test_embedded.py, so a session converts at most once)."""
    if default_model_path().is_dir():
        return default_model_path()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "finetune-cache"))
        return ensure_default_model()


@pytest.fixture(scope="module")
def loaded(model_path: Path):
    return load_for_inference(model_path, None, dtype="float32")


def test_greedy_reply_is_deterministic_and_stops_at_end_of_turn(loaded):
    model, tokenizer = loaded
    reply = generate_reply(model, tokenizer, CAPITAL, max_new_tokens=48)
    assert "Paris" in reply
    assert "<|im_end|>" not in reply
    # It stopped at the end of the turn, well before the token budget.
    assert len(tokenizer(reply).input_ids) < 24
    assert generate_reply(model, tokenizer, CAPITAL, max_new_tokens=48) == reply


def test_streamed_pieces_add_up_to_the_reply(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "Name three colors, in one sentence."}]
    pieces: list[str] = []
    reply = generate_reply(model, tokenizer, messages, max_new_tokens=24, stream=pieces.append)
    assert reply.strip()
    assert len(pieces) > 3
    assert "".join(pieces) == reply
    assert generate_reply(model, tokenizer, messages, max_new_tokens=24) == reply


def test_sampling_follows_the_seed(loaded):
    model, tokenizer = loaded

    def sample(seed: int) -> str:
        torch.manual_seed(seed)
        return generate_reply(
            model, tokenizer, CAPITAL, max_new_tokens=12, temperature=1.0, top_p=0.95
        )

    first = sample(0)
    assert first.strip()
    assert sample(0) == first


def test_chat_remembers_earlier_turns(loaded):
    model, tokenizer = loaded
    lines = iter([SECRET, ASK_SECRET])
    written: list[str] = []
    history = chat_loop(
        model, tokenizer, lambda: next(lines, None), written.append, max_new_tokens=24
    )

    assert [message["role"] for message in history] == ["user", "assistant"] * 2
    assert "Ada" in history[3]["content"]
    # Without the first turn the model does not know the word.
    alone = generate_reply(
        model, tokenizer, [{"role": "user", "content": ASK_SECRET}], max_new_tokens=24
    )
    assert "Ada" not in alone
    # Every reply is written, each followed by a newline.
    assert "".join(written) == history[1]["content"] + "\n" + history[3]["content"] + "\n"


def test_chat_reset_forgets_and_exit_stops_reading(loaded):
    model, tokenizer = loaded
    lines = iter([SECRET, "/reset", "", ASK_SECRET, "/exit", "never read"])
    written: list[str] = []
    history = chat_loop(
        model, tokenizer, lambda: next(lines, None), written.append, max_new_tokens=16
    )

    assert "(history cleared)\n" in written
    assert [message["content"] for message in history if message["role"] == "user"] == [ASK_SECRET]
    assert "Ada" not in history[1]["content"]
    assert next(lines) == "never read"


def test_adapter_is_applied_and_its_tokenizer_used(model_path: Path, loaded, tmp_path: Path):
    base_model, _ = loaded
    adapter_dir = tmp_path / "adapter"
    # The reference: a LoRA adapter made and run in memory by peft itself.
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_path),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would change nothing
                parameter.normal_(std=0.05)
    reference.save_pretrained(adapter_dir)
    # Training saves its tokenizer, with the chat template it trained on, next to the adapter.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"  # noqa: E501
    tokenizer.chat_template = template
    tokenizer.save_pretrained(adapter_dir)

    model, adapter_tokenizer = load_for_inference(model_path, adapter_dir, dtype="float32")

    assert adapter_tokenizer.chat_template == template
    inputs = adapter_tokenizer.apply_chat_template(
        CAPITAL, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(logits, reference.eval()(**inputs).logits)
        assert not torch.allclose(logits, base_model(**inputs).logits, atol=1e-3)
    assert generate_reply(model, adapter_tokenizer, CAPITAL, max_new_tokens=8).strip()


def test_folder_without_adapter_is_refused(model_path: Path, tmp_path: Path):
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        load_for_inference(model_path, tmp_path, dtype="float32")
