"""Writing one GGUF file from a merged checkpoint, one tensor at a time.

The `gguf` package's writer normally holds every tensor until the end. Here the header, the
metadata and the tensor table (names, shapes, types, byte sizes: all known from the safetensors
headers) are written first, then each tensor is read, converted, encoded and appended on its own,
so memory holds one tensor and its encoded copy, whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from finetune.export.families import (
    Family,
    TensorNames,
    gguf_values,
    llama3_rope_factors,
    write_hyperparameters,
)
from finetune.export.quant import encode, encoded_size, tensor_type
from finetune.export.tensors import StoredTensor, read_tensors, stored_tensors
from finetune.export.vocab import Vocabulary, write_vocabulary

F32 = gguf.GGMLQuantizationType.F32


@dataclass
class PlannedTensor:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    source: StoredTensor | None  # None for a tensor computed here (rope_freqs)


@dataclass
class GgufContents:
    """What goes into the file besides the weights."""

    name: str
    family: Family
    text_config: object
    vocab: Vocabulary
    chat_template: str | None
    file_type: gguf.LlamaFileType
    tensor_type: gguf.GGMLQuantizationType


def write_gguf(
    path: Path, model_dir: Path, contents: GgufContents, log: Callable[[str], object]
) -> int:
    """Write `path`; returns the number of tensors written."""
    family, text = contents.family, contents.text_config
    plan = _plan(stored_tensors(model_dir), contents)
    rope_factors = llama3_rope_factors(text)
    if rope_factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(PlannedTensor(name, tuple(rope_factors.shape), F32, None))
    writer = gguf.GGUFWriter(path=None, arch=family.arch_name)
    try:
        _write_metadata(writer, contents)
        for tensor in plan:
            size = encoded_size(tensor.shape, tensor.qtype)
            writer.add_tensor_info(
                tensor.gguf_name, tensor.shape, np.dtype(np.float32), size, raw_dtype=tensor.qtype
            )
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        from_checkpoint = [tensor for tensor in plan if tensor.source is not None]
        sources = [tensor.source for tensor in from_checkpoint]
        for index, (tensor, (source, values)) in enumerate(
            zip(from_checkpoint, read_tensors(sources), strict=True), start=1
        ):
            array = gguf_values(source.name, values, family, text).numpy()
            writer.write_tensor_data(encode(array, tensor.qtype))
            del values, array  # before the next tensor is read
            if index * 4 // len(plan) != (index - 1) * 4 // len(plan):  # each quarter
                log(f"  {index}/{len(plan)} tensors written")
        if rope_factors is not None:
            writer.write_tensor_data(encode(rope_factors.numpy(), F32))
    finally:
        writer.close()
    return len(plan)


def _write_metadata(writer: gguf.GGUFWriter, contents: GgufContents) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(contents.name)
    writer.add_file_type(contents.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hyperparameters(writer, contents.family, contents.text_config, len(contents.vocab.tokens))
    write_vocabulary(writer, contents.vocab)
    if contents.chat_template:
        writer.add_chat_template(contents.chat_template)


def _plan(stored: list[StoredTensor], contents: GgufContents) -> list[PlannedTensor]:
    """Every tensor of the file, in the order it is written (the checkpoint's order)."""
    text = contents.text_config
    names = TensorNames(contents.family, text.num_hidden_layers)
    tied = bool(getattr(text, "tie_word_embeddings", False))
    plan = []
    for tensor in stored:
        name = names.gguf_name(tensor.name)
        if name is None or (tied and name == "output.weight"):
            continue  # tied: llama.cpp uses token_embd for the output when output is absent
        qtype = tensor_type(name, tensor.shape, contents.tensor_type)
        plan.append(PlannedTensor(name, tensor.shape, qtype, tensor))
    return plan
