"""The export stage: a finished run as one GGUF file for llama.cpp-based runtimes (llama.cpp,
Ollama, LM Studio), and for Ollama a Modelfile next to it.

One public entry point, `export_model` (run.py). Its parts: `families` maps a checkpoint's
architecture, hyperparameters and tensors to llama.cpp's (through the `gguf` package's tables),
`tensors` reads the merged safetensors tensor by tensor, `quant` chooses and encodes tensor types,
`vocab` writes the tokenizer, `prompt` and `chat_format` recover the exact prompt format the run
trained with, `modelfile` writes it as an Ollama template, `gguf_file` writes the file.

May import: finetune.config, finetune.data (the prompt formats the run trained with),
finetune.merge (to merge first), finetune.errors, finetune.fs, finetune.dtypes. It reads what
`train` and `merge` wrote and never imports the train or model stages.
"""

from finetune.errors import ExportError
from finetune.export.quant import LLAMA_QUANTIZE_TYPES, PYTHON_QUANTS
from finetune.export.run import FORMATS, ExportReport, export_model

__all__ = [
    "FORMATS",
    "LLAMA_QUANTIZE_TYPES",
    "PYTHON_QUANTS",
    "ExportError",
    "ExportReport",
    "export_model",
]
