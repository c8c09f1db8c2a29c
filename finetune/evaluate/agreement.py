"""Two models that must compute the same thing, compared on the held-out samples: the merged
model against base + adapter (`--merged`), and an exported GGUF file against the fine-tuned
model (`--gguf`, read back by transformers' own GGUF reader, an implementation independent of
our writer).

Each comparison reports the share of identical greedy answers and the largest |logit
difference| over every position of every sample. A merged model must stay within merge's own
verification tolerance (finetune/merge/verify.py, relative to the largest reference logit).
A GGUF file rounds its weights on purpose, so its logits are reported, not judged; its greedy
answers must all be identical for the 8-bit-and-wider types (f32, f16, bf16, q8_0), and its
tokenizer must turn the prompts' text into the run's tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from finetune.dtypes import short_dtype_name
from finetune.evaluate.progress import progress_bar
from finetune.evaluate.samples import EvalSample
from finetune.merge.verify import NF4_VERIFY_TOLERANCE, VERIFY_TOLERANCE

# GGUF file types whose greedy answers must equal the fine-tuned model's: their rounding moves
# SmolLM2-135M's logits by at most ~1.3 (q8_0), which does not flip a confident answer.
STRICT_GGUF_TYPES = ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16", "MOSTLY_Q8_0")


@dataclass
class Agreement:
    """How far `candidate` is from `reference` on the held-out samples."""

    candidate: str  # "merged model", "GGUF q8_0"
    reference: str  # "base + adapter", "fine-tuned model"
    same_answers: int
    answers: int
    max_logit_diff: float
    allowed_logit_diff: float | None  # None: reported, not judged
    tokenizer_mismatches: int = 0  # GGUF: prompts its tokenizer encodes differently
    strict_answers: bool = False  # every greedy answer must be identical

    @property
    def ok(self) -> bool:
        within = self.allowed_logit_diff is None or self.max_logit_diff <= self.allowed_logit_diff
        answers_ok = not self.strict_answers or self.same_answers == self.answers
        return within and answers_ok and self.tokenizer_mismatches == 0

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def max_logit_difference(
    reference, candidate, samples: list[EvalSample], label: str = "logits"
) -> tuple[float, float]:
    """(largest |logit difference|, largest |reference logit|) over every position of every
    sample, one sample per forward pass (no padding, memory for one sample's logits)."""
    worst, largest = 0.0, 0.0
    device_ref = next(reference.parameters()).device
    device_cand = next(candidate.parameters()).device
    with torch.no_grad():
        for sample in progress_bar(samples, label):
            ids = torch.tensor([sample.input_ids])
            expected = reference(input_ids=ids.to(device_ref), use_cache=False).logits.float()
            got = candidate(input_ids=ids.to(device_cand), use_cache=False).logits.float()
            difference = (expected.cpu() - got.cpu()).abs().max().item()
            worst = difference if difference != difference else max(worst, difference)  # NaN wins
            largest = max(largest, expected.abs().max().item())
    return worst, largest


def merge_tolerance(merged_dir: Path, eval_dtype: torch.dtype, quantized_run: bool) -> float:
    """merge's verification tolerance for this merged model (relative to max(1, |logit|)): by
    the merged weights' dtype and the dtype the evaluation computes in, the looser of the two;
    a QLoRA run's merge may have been rounded through nf4 (--nf4-roundtrip)."""
    if quantized_run:
        return NF4_VERIFY_TOLERANCE
    try:
        config = json.loads((merged_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    stored = short_dtype_name(config.get("dtype") or config.get("torch_dtype") or "fp32")
    computed = short_dtype_name(eval_dtype) or "fp32"
    return max(
        VERIFY_TOLERANCE.get(stored or "fp32", VERIFY_TOLERANCE["fp32"]), VERIFY_TOLERANCE[computed]
    )


def same_answers(first: list[str | None], second: list[str | None]) -> tuple[int, int]:
    """(identical answers, answers compared)."""
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a is not None]
    return sum(a == b for a, b in pairs), len(pairs)


def gguf_file_type(path: Path) -> str:
    """The GGUF's file type as gguf names it (MOSTLY_Q8_0, MOSTLY_F16, ...)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(field.contents())).name
    except ValueError:
        return f"type {field.contents()}"


def load_gguf(path: Path, device):
    """The GGUF file as transformers reads it: model (dequantized to fp32) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.to(device).eval(), tokenizer


def tokenizer_mismatches(run_tokenizer, other_tokenizer, samples: list[EvalSample]) -> int:
    """Prompts whose text the other tokenizer encodes into other tokens than the run's does."""
    mismatches = 0
    for sample in samples:
        text = run_tokenizer.decode(sample.prompt_ids, clean_up_tokenization_spaces=False)
        ours = run_tokenizer.encode(text, add_special_tokens=False)
        theirs = other_tokenizer.encode(text, add_special_tokens=False)
        mismatches += ours != theirs
    return mismatches
