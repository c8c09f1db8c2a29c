"""Generation and chat with a base model, a base model plus a trained adapter, or a merged model.

`load_for_inference` gives a model and tokenizer, `generate_reply` answers one conversation, and
`chat_loop` runs a multi-turn chat over any line reader and text writer (a terminal, or a test's
scripted lists).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BatchEncoding
from transformers.generation.streamers import BaseStreamer

from finetune.config import FinetuneConfig
from finetune.dtypes import keep_4bit_layers_in_compute_dtype, torch_dtype_named
from finetune.errors import FinetuneError, ModelLoadError
from finetune.model.source import model_source

# Tokens that end an assistant turn in common chat templates. Generation stops at the
# tokenizer's eos and at any of these that the tokenizer's template actually uses, so a model
# whose eos is `<|endoftext|>` but whose turns end with `<|im_end|>` still stops after one reply.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

RESET_COMMAND = "/reset"
EXIT_COMMANDS = ("/exit", "/quit")


def load_for_inference(
    model_path: str | Path,
    adapter_dir: Path | None = None,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    model_kwargs: dict | None = None,
    tokenizer_dir: Path | None = None,
):
    """Load a model and its tokenizer, ready for `generate_reply`.

    `model_path` is a local folder, a local .gguf file or a hub id: the base model, or a merged
    model when `adapter_dir` is None. With `adapter_dir` (a PEFT adapter folder, e.g. a training
    run's output_dir or one of its checkpoint-N folders) the adapter is attached to the base.

    The tokenizer comes from `adapter_dir` when it holds one, because training saves the
    tokenizer with the chat template it trained on; otherwise from `model_path`.
    `dtype` is a torch dtype or its name ("bfloat16", "float32", "auto"); `device` defaults to
    the GPU when there is one. `model_kwargs` go to `from_pretrained` (e.g. a
    quantization_config or attn_implementation). `tokenizer_dir` takes the tokenizer from
    another folder (a run's, to query the base model with the run's template).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"{adapter_dir}: no adapter_config.json there; point to a training run's "
                "output_dir (or one of its checkpoint-N folders), or leave the adapter out to "
                "use the base or merged model alone"
            )
    source = model_source(str(model_path))
    try:
        tokenizer_dir = tokenizer_dir or adapter_dir
        if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=_torch_dtype(dtype), **(model_kwargs or {})
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{model_path}: cannot load the model or its tokenizer: {str(error).splitlines()[0]}; "
            "give a folder with config.json, weights and tokenizer files, or a hub id this "
            "machine can download"
        ) from error

    # Models placed while loading (a device_map, bitsandbytes quantization) must stay put.
    placed = any(
        getattr(model, attribute, None)
        for attribute in ("hf_device_map", "is_loaded_in_4bit", "is_loaded_in_8bit")
    )
    if not placed:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    keep_4bit_layers_in_compute_dtype(model)  # the compute dtype asked for, on every CPU
    # Training resizes the embeddings when it adds tokens to the tokenizer (a pad token, a chat
    # template's markers) and saves them in the adapter; the base must match before loading it.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if adapter_dir is not None:
        model = _attach_adapter(model, adapter_dir)
    model.eval()
    return model, tokenizer


@dataclass
class PromptFormat:
    """How a user's message becomes the model's input, exactly as the run trained: through the
    chat template for conversations, or a dataset type's own prompt (alpaca, a custom format,
    completion, input_output)."""

    name: str  # the dataset type, or "chat_template"
    build: Callable[[str], tuple[str, bool]] | None = None  # text -> (prompt, special tokens)

    @property
    def is_chat(self) -> bool:
        return self.build is None


CHAT = PromptFormat("chat_template")


def prompt_format(config: FinetuneConfig | None, tokenizer) -> PromptFormat:
    """The format of the run's first training dataset (the chat template for chat data, or a
    run without a config)."""
    from finetune.data.strategies import Context, strategy_for

    if config is None:
        return CHAT
    dataset = config.datasets[0]
    strategy = strategy_for(dataset)
    if strategy.prompt is None:
        return CHAT
    ctx = Context(dataset=dataset, config=config, tokenizer=tokenizer)
    return PromptFormat(dataset.type_name, lambda text: strategy.prompt(text, ctx))


def prompt_inputs(tokenizer, messages: list[dict], fmt: PromptFormat = CHAT) -> tuple[str, dict]:
    """(the exact prompt text, the model inputs) for `messages` in format `fmt`."""
    if fmt.is_chat:
        if not tokenizer.chat_template:
            raise FinetuneError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; set `chat_template` "
                "in the config (e.g. chatml) and train with it, or use a model that ships one"
            )
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # What apply_chat_template does after rendering, without rendering a second time.
        return text, tokenizer(text, add_special_tokens=False, return_tensors="pt")
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise FinetuneError(
            f"this run trained on single prompts ({fmt.name}); there is no conversation or "
            "system message to format: give one prompt (--prompt, or lines on stdin)"
        )
    text, special_tokens = fmt.build(messages[0]["content"])
    inputs = tokenizer(text, add_special_tokens=special_tokens, return_tensors="pt")
    # Training tokenized prompt and answer as one text, so a prompt's trailing space ("Answer: ")
    # went into the answer's first token (" Seven"). Keep only the tokens that stay the same
    # when an answer follows, as in training; the model writes the rest.
    ids = inputs["input_ids"][0].tolist()
    probe = tokenizer(text + "A", add_special_tokens=special_tokens)["input_ids"]
    keep = next((i for i, (a, b) in enumerate(zip(ids, probe, strict=False)) if a != b), len(ids))
    if keep < len(ids):
        inputs = BatchEncoding({name: value[:, :keep] for name, value in inputs.items()})
    return text, inputs


def generate_reply(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stream: Callable[[str], object] | None = None,
    fmt: PromptFormat = CHAT,
    show_prompt: Callable[[str, int], object] | None = None,
) -> str:
    """The assistant's reply to `messages` (`[{"role": ..., "content": ...}, ...]`).

    The conversation is formatted as the run trained (`fmt`: the tokenizer's chat template and
    a generation prompt by default). Decoding is greedy when `temperature` is 0, else sampled
    with `temperature` and `top_p`. It stops at eos or the template's end-of-turn token. With
    `stream`, each new piece of text is passed to it as soon as it is decoded; the pieces join
    to exactly the returned text. `show_prompt` gets the exact prompt text and its token count.
    """
    from transformers import GenerationConfig

    if temperature < 0 or not 0 < top_p <= 1:
        raise FinetuneError(
            f"temperature must be >= 0 and top_p in (0, 1]; got temperature={temperature}, "
            f"top_p={top_p}"
        )
    text, inputs = prompt_inputs(tokenizer, messages, fmt)
    inputs = inputs.to(model.device)
    if show_prompt is not None:
        show_prompt(text, inputs["input_ids"].shape[1])
    stop_ids = end_of_turn_ids(model, tokenizer)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    # A fresh GenerationConfig, not the model's: its saved sampling defaults would otherwise
    # turn "temperature 0" into something other than greedy.
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
        **(sampling if temperature > 0 else {"do_sample": False}),
    )
    streamer = _CallbackStreamer(tokenizer, stream) if stream is not None else None
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=generation_config, streamer=streamer)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return _decode(tokenizer, new_tokens.tolist())


def chat_loop(
    model,
    tokenizer,
    read_line: Callable[[], str | None],
    write: Callable[[str], object],
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stream: bool = True,
) -> list[dict]:
    """Chat until `read_line` returns None (end of input) or the user types /exit.

    `read_line` returns the user's next line (showing a prompt is its job, e.g. `input("> ")`);
    `write` receives the replies, streamed piece by piece when `stream` is true, each reply
    followed by a newline. The history of the conversation goes into every prompt; /reset
    clears it. Returns the history at the end.
    """
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(start)
    while (line := read_line()) is not None:
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            history = list(start)
            write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        reply = generate_reply(
            model,
            tokenizer,
            history,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stream=write if stream else None,
        )
        if not stream:
            write(reply)
        write("\n")
        history.append({"role": "assistant", "content": reply})
    return history


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: eos (tokenizer's and generation config's) and the chat
    template's end-of-turn token."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for token_id in [tokenizer.eos_token_id, *_as_list(configured)]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in template and token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    if not ids:
        raise FinetuneError(
            f"tokenizer {tokenizer.name_or_path!r} has no eos token and its chat template no "
            "known end-of-turn token, so generation would never stop; set eos_token in the "
            "tokenizer_config.json"
        )
    return ids


class _CallbackStreamer(BaseStreamer):
    """Passes each newly decoded piece of the reply to a callback, skipping the prompt.

    It re-decodes the whole reply at every token and sends what is new: byte-level BPE splits
    characters across tokens, and decoding tokens one by one would emit broken characters.
    """

    def __init__(self, tokenizer, callback: Callable[[str], object]):
        self.tokenizer = tokenizer
        self.callback = callback
        self.token_ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.token_ids.extend(value.reshape(-1).tolist())
        text = _decode(self.tokenizer, self.token_ids)
        # A trailing U+FFFD is a character whose remaining bytes are in the next token.
        if text.endswith("\ufffd"):
            return
        self._send(text)

    def end(self) -> None:
        self._send(_decode(self.tokenizer, self.token_ids))

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.callback(text[self.sent :])
            self.sent = len(text)


def _decode(tokenizer, token_ids: list[int]) -> str:
    # Without cleanup, decoding more tokens only appends text, so streamed pieces add up to the
    # final reply.
    return tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _attach_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ModelLoadError(
            f"{adapter_dir}: the adapter does not fit the base model ({error}); use the same "
            "base_model the adapter was trained on"
        ) from error


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    return torch_dtype_named(dtype)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
