"""The run's tokenizer as GGUF metadata, in the two shapes llama.cpp reads.

- `gpt2`: byte-level BPE (SmolLM2, Qwen2/2.5, Llama 3): the vocabulary in its byte-level
  spelling, the merges, and `tokenizer.ggml.pre` naming the pre-tokenizer. llama.cpp names it by
  hashing the tokens of a fixed probe text (convert_hf_to_gguf.py `get_vocab_base_pre`); the same
  hash is computed here, with the run's own tokenizer, so the name says how *this* tokenizer
  splits text.
- `llama`: sentencepiece-style BPE with byte fallback (Gemma, Llama 2, Mistral v0.1-v0.3), as a
  `tokenizer.json` stores it: pieces with `▁` for spaces and `<0xNN>` byte pieces. llama.cpp's
  sentencepiece tokenizer merges the adjacent pair whose result scores highest, so each piece
  gets minus the rank of the merge that makes it: the same merges, in the same order, as the
  BPE the run trained with. The merges are written too (transformers' reader uses them).

Added tokens are CONTROL when special (they are matched whole and never split), USER_DEFINED
otherwise; ids the embedding has but the tokenizer lacks are `[PADn]`, UNUSED. The end-of-turn
token the run trained to emit is written as EOS (and EOT), so a runtime stops where training
stopped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from hashlib import sha256

import gguf

from finetune.errors import ExportError

T = gguf.TokenType
# llama.cpp's probe text for naming BPE pre-tokenizers (convert_hf_to_gguf.py).
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 of str(token ids of PROBE_TEXT) -> llama.cpp's pre-tokenizer name (the families we
# export; llama.cpp's table has many more).
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM/2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}
# When the hash is unknown (a vocabulary with added tokens hashes differently), the splitting
# regex of the tokenizer.json names the pre-tokenizer: Llama 3's and Qwen2's published ones.
PRE_TOKENIZER_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocabulary:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None
    special_ids: dict[str, int]  # bos, eos, eot, unk, pad
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None

    @property
    def eos_token(self) -> str:
        return self.tokens[self.special_ids["eos"]]


def read_vocabulary(tokenizer, rows: int, eos: str, end_of_turn: str, log) -> Vocabulary:
    """The GGUF vocabulary of a fast tokenizer whose model has `rows` embedding rows, with `eos`
    and `end_of_turn` (token texts) as its EOS and EOT when they are single tokens."""
    backend = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"tokenizer model {model.get('type')!r}: export writes BPE tokenizers (byte-level "
            "like SmolLM2/Qwen/Llama 3, or with byte fallback like Gemma/Mistral)"
        )
    byte_fallback = bool(model.get("byte_fallback"))
    ids = backend.get_vocab(with_added_tokens=True)
    if max(ids.values()) >= rows:
        raise ExportError(
            f"the tokenizer has ids up to {max(ids.values())} but the model only {rows} embedding "
            "rows; was a token added without resizing the embeddings?"
        )
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [int(T.UNUSED)] * rows
    for text, index in ids.items():
        tokens[index] = text
        types[index] = int(_token_type(text, added.get(index), byte_fallback))
    if tokenizer.unk_token_id is not None and byte_fallback:
        types[tokenizer.unk_token_id] = int(T.UNKNOWN)
    merges = [_merge_text(pair, byte_level=not byte_fallback) for pair in model.get("merges", [])]
    special_ids = _special_ids(tokenizer, ids, eos, end_of_turn)
    with_special = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    return Vocabulary(
        model="llama" if byte_fallback else "gpt2",
        pre="default" if byte_fallback else _pre_tokenizer_name(backend, spec, log),
        tokens=tokens,
        token_types=types,
        merges=merges,
        scores=_merge_scores(tokens, model.get("merges", [])) if byte_fallback else None,
        special_ids=special_ids,
        add_bos=len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id,
        add_eos=len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id,
        add_space_prefix=_adds_space_prefix(spec) if byte_fallback else None,
    )


def write_vocabulary(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for kind, index in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)


def _token_type(text: str, added: dict | None, byte_fallback: bool) -> T:
    if added is not None:
        # llama.cpp's `does_token_look_special`: some models leave these unmarked.
        looks_special = (text.startswith("<|") and text.endswith("|>")) or text.startswith(
            "<unused"
        )
        return T.CONTROL if added.get("special") or looks_special else T.USER_DEFINED
    if byte_fallback and BYTE_PIECE.fullmatch(text):
        return T.BYTE
    return T.NORMAL


def _merge_text(pair: str | list[str], byte_level: bool) -> str:
    """A merge as llama.cpp stores it: "a b" (a space inside a part written as in gguf-py)."""
    if isinstance(pair, str):
        return pair
    if byte_level:
        pair = ["".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair]
    return " ".join(pair)


def _merge_scores(tokens: list[str], merges: list) -> list[float]:
    """Minus the rank of the first merge that makes each piece; 0 for pieces no merge makes."""
    rank = {}
    for index, pair in enumerate(merges):
        left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
        rank.setdefault(left + right, index)
    return [-float(rank[token]) if token in rank else 0.0 for token in tokens]


def _special_ids(tokenizer, ids: dict[str, int], eos: str, end_of_turn: str) -> dict[str, int]:
    found = {
        "bos": tokenizer.bos_token_id,
        "eos": ids.get(eos, tokenizer.eos_token_id),
        "eot": ids.get(end_of_turn),
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    if found["eos"] is None:
        raise ExportError("the tokenizer has no EOS token: a runtime would never stop generating")
    return {kind: index for kind, index in found.items() if index is not None}


def _pre_tokenizer_name(backend, spec: dict, log) -> str:
    digest = sha256(str(backend.encode(PROBE_TEXT, add_special_tokens=True).ids).encode())
    name = PRE_TOKENIZERS.get(digest.hexdigest())
    if name is None:
        patterns = _split_patterns(spec.get("pre_tokenizer"))
        names = {PRE_TOKENIZER_REGEXES.get(pattern) for pattern in patterns} - {None}
        name = names.pop() if len(names) == 1 else None
    if name is None:
        log(
            "warning: llama.cpp knows no name for this tokenizer's pre-tokenizer (probe hash "
            f"{digest.hexdigest()[:12]}...): writing 'default', so llama.cpp may split some "
            "text (digits, punctuation runs) differently from training"
        )
        return "default"
    return name


def _split_patterns(node) -> list[str]:
    """Every `Split` regex in a tokenizer.json pre-tokenizer."""
    return [
        part["pattern"]["Regex"]
        for part in _parts(node)
        if isinstance(part.get("pattern"), dict) and "Regex" in part["pattern"]
    ]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts `▁` before the text (sentencepiece's add_dummy_prefix)."""
    for part in _parts([spec.get("normalizer"), spec.get("pre_tokenizer")]):
        if part.get("type") == "Prepend" and part.get("prepend") == "\u2581":
            return True
        if part.get("type") == "Metaspace":
            scheme = part.get("prepend_scheme")
            if scheme in ("first", "always") or (scheme is None and part.get("add_prefix_space")):
                return True
    return False


def _parts(node) -> list[dict]:
    """Every component of a tokenizer.json normalizer or pre-tokenizer (sequences flattened)."""
    if isinstance(node, list):
        return [part for item in node for part in _parts(item)]
    if not isinstance(node, dict):
        return []
    nested = [value for value in node.values() if isinstance(value, (list, dict))]
    return [node, *(part for value in nested for part in _parts(value))]
