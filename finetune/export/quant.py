"""Quantization types: what the `gguf` package writes in Python, and what only llama.cpp can.

The Python quantizer writes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1. K-quants (Q4_K_M,
Q6_K, ...) exist there for reading only, so those go through llama.cpp's `llama-quantize` when it
is installed, from an f16 export, and are refused with the command to run otherwise.

As llama.cpp's converter does, norms, biases and every other 1-D tensor stay F32, and a weight
whose rows do not split into whole quantization blocks falls back to F16. With the 4- and 5-bit
types the token embedding and the output projection are kept in Q8_0: they are the tensors most
sensitive to rounding, and llama.cpp's own quantizer keeps them at higher precision too.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, quants

from finetune.errors import ExportError

Q = GGMLQuantizationType
# --quant name -> (tensor type for 2-D weights, the file type recorded in the header)
PYTHON_QUANTS: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
}
# Types llama.cpp's `llama-quantize` writes from an f16 file (its names, upper-cased there).
LLAMA_QUANTIZE_TYPES = (
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
)
LLAMA_QUANTIZE = "llama-quantize"
LOW_BIT = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
SENSITIVE = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class QuantPlan:
    """How to write the file: directly in `name`, or in f16 first and then `llama-quantize`."""

    name: str  # what the user asked for, lower-case
    written: str  # the type the Python writer produces (f16 when llama.cpp finishes the job)
    llama_quantize: str | None = None  # the llama-quantize binary, for K-quants

    @property
    def tensor_type(self) -> GGMLQuantizationType:
        return PYTHON_QUANTS[self.written][0]

    @property
    def file_type(self) -> LlamaFileType:
        return PYTHON_QUANTS[self.written][1]


def plan_quant(name: str, f16_file_hint: str, k_quant_file_hint: str) -> QuantPlan:
    """The plan for `--quant NAME`; an ExportError for a type neither writer can produce.

    The hints are the paths the refusal message shows in the commands to run instead.
    """
    key = name.strip().lower()
    if key in PYTHON_QUANTS:
        return QuantPlan(key, key)
    if key in LLAMA_QUANTIZE_TYPES:
        binary = shutil.which(LLAMA_QUANTIZE)
        if binary:
            return QuantPlan(key, "f16", binary)
        raise ExportError(
            f"--quant {name}: a llama.cpp K-quant, which the gguf Python package cannot write, and "
            f"{LLAMA_QUANTIZE} is not on PATH. Export f16 and quantize it with llama.cpp:\n"
            f"  finetune export CONFIG --quant f16 && {LLAMA_QUANTIZE} {f16_file_hint} "
            f"{k_quant_file_hint} {key.upper()}"
        )
    choices = ", ".join([*PYTHON_QUANTS, *LLAMA_QUANTIZE_TYPES])
    raise ExportError(f"--quant {name}: unknown type; choose one of {choices}")


def tensor_type(name: str, shape: tuple[int, ...], wanted: GGMLQuantizationType):
    """The type one tensor is written in (llama.cpp's converter's rules, see the module doc)."""
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return Q.F32
    if wanted in LOW_BIT and name in SENSITIVE:
        wanted = Q.Q8_0
    block_size, _ = GGML_QUANT_SIZES[wanted]
    if shape[-1] % block_size:
        return Q.F16
    return wanted


def encoded_size(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of this shape in this type."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block_size * type_size


ROWS_PER_CHUNK = 1024  # the quantizer's temporaries stay a few times one chunk


def encode(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values -> the bytes (or float array) the GGUF file stores, a chunk of rows at a
    time so that a large embedding never needs several float copies of itself."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F32:
        return values
    if values.ndim < 2 or values.shape[0] <= ROWS_PER_CHUNK:
        return quants.quantize(values, qtype)
    first = quants.quantize(values[:ROWS_PER_CHUNK], qtype)
    out = np.empty((values.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:ROWS_PER_CHUNK] = first
    for start in range(ROWS_PER_CHUNK, values.shape[0], ROWS_PER_CHUNK):
        out[start : start + ROWS_PER_CHUNK] = quants.quantize(
            values[start : start + ROWS_PER_CHUNK], qtype
        )
    return out


def run_llama_quantize(binary: str, source: Path, target: Path, quant: str, log) -> None:
    """`llama-quantize SOURCE TARGET TYPE`; an ExportError with its last output on failure."""
    command = [binary, str(source), str(target), quant.upper()]
    log("running: " + " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ExportError(
            f"{LLAMA_QUANTIZE} failed (exit {result.returncode}): " + " / ".join(tail)
        )
