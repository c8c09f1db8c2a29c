"""Run folders for the export tests, built the way `finetune train` leaves them: a tiny base
model saved as a normal checkpoint, a peft adapter with non-zero updates, and the tokenizer with
the run's chat template in output_dir."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GemmaTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from finetune.config import FinetuneConfig

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "data" / "samples"
TEMPLATES = ROOT / "finetune" / "data" / "templates"
# Training conversations for the prompt-format tests: the sample chat data, quickstart
# questions, and a conversation with a system message, digits and non-ASCII text.
CONVERSATIONS = (
    [json.loads(line) for line in (SAMPLES / "chat.jsonl").read_text().splitlines()]
    + [
        json.loads(line) for line in (SAMPLES / "quickstart_heldout.jsonl").read_text().splitlines()
    ][:6:2]
    + [
        {
            "messages": [
                {"role": "system", "content": "Answer with numbers only."},
                {"role": "user", "content": "What is 12345 + 678? And 3.14 * 2?"},
                {"role": "assistant", "content": "13023 and 6.28"},
                {"role": "user", "content": "Café, naïve, 東京 — spell them."},
                {"role": "assistant", "content": "C-a-f-é, n-a-ï-v-e, 東-京."},
            ]
        }
    ]
)
# Alpaca-style dataset types and a sample file for each.
ALPACA_CASES = [
    ("alpaca", "alpaca.jsonl"),
    ("alpaca:chatml", "alpaca.jsonl"),
    ("alpaca_chat", "alpaca.jsonl"),
    ("alpaca:phi", "alpaca.jsonl"),
    ("alpaca_chat.load_qa", "qa.jsonl"),
    ("custom", "custom_format.jsonl"),
]
CUSTOM = {
    "field_instruction": "task",
    "field_input": "word",
    "field_output": "result",
    "format": "{instruction}\nWord: {input}\nAnswer: ",
    "no_input_format": "{instruction}\nAnswer: ",
}
# Peaked attention and logits, so that greedy choices are not coin flips (DESIGN.md).
INIT = 0.25


def tiny_config(family: str, tokenizer):
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "initializer_range": INIT,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "llama":  # SmolLM2's shape: tied embeddings
        return LlamaConfig(**shape, tie_word_embeddings=True, rope_theta=100000.0)
    if family == "mistral":
        return MistralConfig(**shape, tie_word_embeddings=False, sliding_window=None)
    if family == "qwen2":  # q/k/v biases; untied like Qwen2.5-7B
        return Qwen2Config(**shape, tie_word_embeddings=False, rope_theta=1000000.0)
    if family == "gemma3":
        # llama.cpp and transformers' GGUF reader both take query_pre_attn_scalar = head_dim =
        # 256 (the published Gemma 3 shapes), so the tiny model uses that head size.
        return Gemma3TextConfig(
            **{**shape, "num_attention_heads": 2, "num_key_value_heads": 1},
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            tie_word_embeddings=True,
        )
    raise ValueError(family)


# Turn markers of the chat templates the tests use, special tokens as in the real models.
CHAT_MARKERS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "<|im_sep|>",
    "<start_of_turn>",
    "<end_of_turn>",
]


def small_tokenizer(style: str):
    """A small tokenizer of a real model's kind, trained on the repository's sample data:

    - "gemma": Gemma's (BPE with byte fallback, spaces as `▁`, no prefix space; <bos> added);
    - "llama2": Llama 2 / Mistral v0.1's (the same, with a `▁` prefix; <s> added);
    - "bytelevel": Qwen2's (byte-level BPE, Qwen's splitting regex, no BOS).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizer, Qwen2Tokenizer

    lines = []
    for path in sorted(SAMPLES.glob("*.jsonl")):
        lines += path.read_text(encoding="utf-8").splitlines()
    if style == "bytelevel":
        specials = ["<|endoftext|>"]
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=900, special_tokens=specials, initial_alphabet=alphabet
        )
    else:
        specials = (
            ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
            if style == "gemma"
            else ["<unk>", "<s>", "</s>"]
        )
        raw = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        raw.normalizer = normalizers.Replace(" ", "▁")
        byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials + byte_pieces)
    raw.train_from_iterator(lines, trainer)
    spec = json.loads(raw.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    if style == "gemma":
        tokenizer = GemmaTokenizer(vocab=spec["vocab"], merges=merges)
        markers = ["<start_of_turn>", "<end_of_turn>"]
    elif style == "llama2":
        tokenizer = LlamaTokenizer(vocab=spec["vocab"], merges=merges, add_bos_token=True)
        markers = CHAT_MARKERS
    else:
        tokenizer = Qwen2Tokenizer(vocab=spec["vocab"], merges=merges)
        markers = CHAT_MARKERS
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return tokenizer


def save_base(family: str, tokenizer, folder: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tokenizer))
    with torch.no_grad():  # norms start at 1 (or 0 in Gemma's 1 + w): make them carry values
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.3 * torch.randn(param.shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_run(
    base: Path,
    folder: Path,
    *,
    dataset_type: str | dict = "chat_template",
    chat_template: str | None = None,
    dataset_path: Path | None = None,
) -> FinetuneConfig:
    """A run folder as `train` leaves it; returns the run's config."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft starts B at zero: an untouched adapter would change nothing
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    default = SAMPLES / ("chat.jsonl" if dataset_type == "chat_template" else "alpaca.jsonl")
    return FinetuneConfig(
        base_model=str(base),
        datasets=[{"path": str(dataset_path or default), "type": dataset_type}],
        output_dir=str(folder),
    )


def template_text(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def merge_from(base: Path):
    """The merge arguments the CLI derives from a run's record, for a local base folder."""
    return lambda: {"base": str(base), "verify": False}  # merge has its own tests


def variant_run(
    run: Path,
    folder: Path,
    *,
    dataset_type: str | dict = "chat_template",
    chat_template: str | None = None,
    dataset_path: Path | None = None,
) -> FinetuneConfig:
    """Another run of the same base and adapter (so the same merged model, linked, not merged
    again), trained with another prompt format."""
    import shutil

    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(run / name, folder / name)  # keeps the mtime: not "newer than merged/"
    (folder / "merged").symlink_to((run / "merged").resolve(), target_is_directory=True)
    tokenizer = AutoTokenizer.from_pretrained(run)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    default = SAMPLES / ("chat.jsonl" if dataset_type == "chat_template" else "alpaca.jsonl")
    return FinetuneConfig(
        base_model=str(run),
        datasets=[{"path": str(dataset_path or default), "type": dataset_type}],
        output_dir=str(folder),
    )


@dataclass
class Run:
    family: str
    config: FinetuneConfig
    folder: Path
    base: Path
    tokenizer: object

    @property
    def merge_arguments(self):
        return merge_from(self.base)


# family -> (tokenizer kind, chat template the run trains with; None: the tokenizer's own)
FAMILY_RUNS = {
    "llama": ("smollm2", None),  # SmolLM2 itself: its tokenizer and its ChatML template
    "mistral": ("llama2", "mistral_v2v3"),
    "qwen2": ("bytelevel", "qwen_25"),
    "gemma3": ("gemma", "gemma3"),
}


def build_run(family: str, root: Path, smollm2_dir: Path) -> Run:
    """A run of `family` with its kind of tokenizer and template, merged (merge has its own
    tests; the CLI test covers export merging first)."""
    from finetune.merge import merge_adapter

    kind, template = FAMILY_RUNS[family]
    if kind == "smollm2":
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    else:
        tokenizer = small_tokenizer(kind)
    base = save_base(family, tokenizer, root / "base")
    config = make_run(base, root / "run", chat_template=template and template_text(template))
    merge_adapter(base, root / "run", root / "run" / "merged", verify=False, log=lambda _: None)
    return Run(family, config, root / "run", base, AutoTokenizer.from_pretrained(root / "run"))
