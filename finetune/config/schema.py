"""The config schema: one pydantic model, grouped by section.

Longer than our ~400-line guide on purpose: the schema stays in one place (one model, each
section's fields beside the checks that read them), so a reader finds every key here.

This file is the single source of truth for config keys, their types, defaults and help
text; the JSON Schema (`finetune validate --schema`) and the README's config reference are
generated from it. Key names and meanings follow Axolotl. Each cross-field check sits in the
section whose keys it reads; all of them report together, so a user sees every problem at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Prompt strategies (`type:`) are one module each in finetune/data/strategies/; a mapping
# (`type: {field_instruction: ...}`) defines a custom alpaca-like format instead.
from finetune.config.vocabulary import CHAT_TEMPLATES, DATASET_TYPES

CHAT_TEMPLATE_CHOICES = tuple(CHAT_TEMPLATES)

SECTIONS = (
    "model",
    "quantization",
    "adapter",
    "datasets",
    "sequence & packing",
    "training",
    "evaluation & saving",
    "precision & memory",
    "distributed",
    "logging",
)

OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "adagrad",
    "sgd",
    "rmsprop",
    "lion_8bit",
    "lion_32bit",
    "paged_lion_8bit",
    "paged_lion_32bit",
    "ademamix",
    "ademamix_8bit",
)

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "warmup_stable_decay",
)

TrainOnEos = Literal["turn", "all", "last", "none"]


def option(section: str, default: Any = None, description: str = "", **constraints: Any) -> Any:
    """A schema field that knows its section (used to group `validate` output and the docs)."""
    return Field(
        default, description=description, json_schema_extra={"section": section}, **constraints
    )


class Problems(ValueError):
    """Several `(key, message)` problems found by cross-field checks, reported together."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))


class DatasetFormat(BaseModel):
    """A user-defined alpaca-like prompt format, given as a mapping in a dataset's `type:`."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str = Field("", description="System text placed before every prompt.")
    system_format: str = Field("{system}", description="How `{system}` is rendered.")
    field_system: str = Field("system", description="Column holding a per-row system prompt.")
    field_instruction: str = Field("instruction", description="Column holding the instruction.")
    field_input: str = Field("input", description="Column holding the optional input.")
    field_output: str = Field("output", description="Column holding the response to train on.")
    format: str = Field(
        "{instruction} {input} ", description="Prompt template with `{instruction}` and `{input}`."
    )
    no_input_format: str = Field(
        "{instruction} ", description="Prompt template used when the row has no input."
    )


class DatasetConfig(BaseModel):
    """One entry of `datasets:` or `test_datasets:`."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Local file or folder, or a Hugging Face Hub dataset id.")
    type: str | DatasetFormat = Field(
        description="Prompt strategy (" + ", ".join(DATASET_TYPES) + ") or a custom format mapping."
    )
    ds_type: Literal["json", "csv", "parquet", "arrow", "text"] | None = Field(
        None, description="File format when the extension does not say it."
    )
    data_files: str | list[str] | None = Field(None, description="File(s) to read within `path`.")
    split: str = Field("train", description="Split to read.")
    name: str | None = Field(None, description="Dataset configuration name on the Hub.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    field: str | None = Field(None, description="Column with the raw text for `completion`.")
    field_messages: str = Field("messages", description="Column with the conversation list.")
    message_property_mappings: dict[str, str] | None = Field(
        None,
        description="Message keys to read role/content from, e.g. {role: from, content: value}.",
    )
    message_field_role: str | None = Field(None, description="Legacy name of the role key.")
    message_field_content: str | None = Field(None, description="Legacy name of the content key.")
    message_field_training: str = Field(
        "training", description="Per-message key that switches training on or off for it."
    )
    roles: dict[str, list[str]] | None = Field(
        None, description="More role aliases, e.g. {assistant: [bot]} (human/gpt are known)."
    )
    roles_to_train: list[str] = Field(["assistant"], description="Roles whose turns are trained.")
    train_on_eos: TrainOnEos = Field(
        "turn", description="Which end-of-turn tokens are trained: turn, all, last or none."
    )
    chat_template: str | None = Field(None, description="Chat template for this dataset only.")
    chat_template_jinja: str | None = Field(
        None, description="Custom Jinja chat template (text or path) for this dataset only."
    )
    drop_system_message: bool = Field(False, description="Drop system turns from conversations.")

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        return _known_chat_template(value)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str | DatasetFormat) -> str | DatasetFormat:
        if isinstance(value, str) and value not in DATASET_TYPES:
            raise ValueError(f"unknown type {value!r}; known types: {', '.join(DATASET_TYPES)}")
        return value


class FinetuneConfig(BaseModel):
    """A complete fine-tuning run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    # ---------------------------------------------------------------- model
    base_model: str = option("model", ..., "Hub id, local folder or local .gguf file to tune.")
    base_model_config: str | None = option(
        "model", None, "Where to read the model config when it differs from `base_model`."
    )
    revision_of_model: str | None = option("model", None, "Hub revision of `base_model`.")
    tokenizer_config: str | None = option(
        "model", None, "Where to load the tokenizer when it differs from `base_model`."
    )
    tokenizer_use_fast: bool = option("model", True, "Use the fast (Rust) tokenizer.")
    trust_remote_code: bool = option(
        "model", False, "Run model code from the checkpoint's repository. Off unless you trust it."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = option(
        "model", None, "Attention backend; default sdpa (flash_attention_2 needs a CUDA GPU)."
    )
    flash_attention: bool = option(
        "model", False, "Axolotl's legacy switch for `attn_implementation: flash_attention_2`."
    )
    sdp_attention: bool = option(
        "model", False, "Axolotl's legacy switch for `attn_implementation: sdpa`."
    )

    def _check_model(self) -> list[tuple[str, str]]:
        legacy = self._legacy_attention()
        if len(legacy) > 1 or (legacy and self.attn_implementation not in (None, legacy[0])):
            return [
                (
                    "attn_implementation",
                    "conflicts with flash_attention/sdp_attention; keep only attn_implementation",
                )
            ]
        return []

    def _legacy_attention(self) -> list[str]:
        switches = (("flash_attention_2", self.flash_attention), ("sdpa", self.sdp_attention))
        return [name for name, chosen in switches if chosen]

    # --------------------------------------------------------- quantization
    load_in_4bit: bool = option(
        "quantization", False, "Load the base model in 4-bit with bitsandbytes (QLoRA)."
    )
    load_in_8bit: bool = option("quantization", False, "Load the base model in 8-bit.")
    bnb_config_kwargs: dict[str, Any] = option(
        "quantization",
        {},
        "Extra BitsAndBytesConfig arguments (default: nf4, double quantization).",
    )

    def _check_quantization(self) -> list[tuple[str, str]]:
        problems = []
        if self.load_in_4bit and self.load_in_8bit:
            problems.append(
                ("load_in_8bit", "load_in_4bit and load_in_8bit are exclusive; keep one")
            )
        if (self.load_in_4bit or self.load_in_8bit) and self.adapter is None:
            key = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
            problems.append(
                (key, "quantized weights cannot be trained directly; set `adapter: lora` or qlora")
            )
        return problems

    # -------------------------------------------------------------- adapter
    adapter: Literal["lora", "qlora"] | None = option(
        "adapter", None, "Adapter to train: lora or qlora (LoRA on a 4-bit base)."
    )
    lora_model_dir: str | None = option(
        "adapter", None, "Existing adapter folder to continue training from."
    )
    lora_r: int = option("adapter", 8, "LoRA rank.", gt=0)
    lora_alpha: int = option("adapter", 16, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = option("adapter", 0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    lora_target_modules: list[str] | None = option(
        "adapter", None, "Module names or regexes to adapt, e.g. [q_proj, v_proj]."
    )
    lora_target_linear: bool = option(
        "adapter", False, "Adapt every linear layer except the output head."
    )
    lora_modules_to_save: list[str] | None = option(
        "adapter",
        None,
        "Modules trained in full and saved with the adapter (embed_tokens, lm_head).",
    )
    lora_fan_in_fan_out: bool = option(
        "adapter",
        False,
        "Set for layers that store weights as (fan_in, fan_out), like GPT-2's Conv1D.",
    )
    peft_use_dora: bool = option("adapter", False, "Train DoRA (weight-decomposed LoRA).")
    peft_use_rslora: bool = option("adapter", False, "Use rank-stabilized scaling alpha / sqrt(r).")

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _modules_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("lora_target_modules")
    @classmethod
    def _modules_are_regexes(cls, value: list[str] | None) -> list[str] | None:
        for entry in value or []:
            try:
                re.compile(entry)
            except re.error as exc:
                raise ValueError(f"{entry!r} is not a valid regular expression ({exc})") from None
        return value

    def _check_adapter(self) -> list[tuple[str, str]]:
        if self.adapter == "qlora" and not self.load_in_4bit:
            return [("adapter", "qlora needs `load_in_4bit: true`; set it, or use `adapter: lora`")]
        return []

    # ------------------------------------------------------------- datasets
    datasets: list[DatasetConfig] = option(
        "datasets", ..., "Training datasets, each formatted by its own `type`.", min_length=1
    )
    test_datasets: list[DatasetConfig] | None = option(
        "datasets", None, "Explicit evaluation datasets (instead of splitting off `val_set_size`)."
    )
    dataset_prepared_path: str = option(
        "datasets", "last_run_prepared", "Folder for the tokenized dataset cache."
    )
    dataset_processes: int | None = option(
        "datasets",
        None,
        "Threads the fast tokenizer uses in preprocessing (default: all cores).",
        ge=1,
    )
    shuffle_merged_datasets: bool = option(
        "datasets", True, "Shuffle after concatenating the datasets."
    )
    chat_template: str | None = option(
        "datasets",
        None,
        "Chat template: " + ", ".join(CHAT_TEMPLATE_CHOICES) + ".",
    )
    chat_template_jinja: str | None = option(
        "datasets", None, "Custom Jinja chat template, as text or a path."
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        return _known_chat_template(value)

    default_system_message: str | None = option(
        "datasets", None, "System message added to conversations that have none."
    )
    train_on_inputs: bool = option(
        "datasets", False, "Train on prompt tokens too, not only on responses."
    )
    special_tokens: dict[str, str] | None = option(
        "datasets", None, "Special tokens to set on the tokenizer (bos/eos/pad/unk_token)."
    )
    tokens: list[str] | None = option("datasets", None, "New tokens to add to the vocabulary.")

    @field_validator("datasets", mode="before")
    @classmethod
    def _datasets_not_empty(cls, value: Any) -> Any:
        if value is None or value == []:
            raise ValueError("no datasets; add at least one entry with `path` and `type`")
        return value

    # --------------------------------------------------- sequence & packing
    sequence_len: int = option(
        "sequence & packing", 2048, "Maximum tokens per sample (and per packed row).", ge=16
    )
    excess_length_strategy: Literal["drop", "truncate", "raise"] = option(
        "sequence & packing", "drop", "What to do with samples longer than `sequence_len`."
    )
    sample_packing: bool = option(
        "sequence & packing", False, "Pack several samples into each row, without cross-attention."
    )
    eval_sample_packing: bool | None = option(
        "sequence & packing", None, "Pack the eval set too (default: follows `sample_packing`)."
    )
    pad_to_sequence_len: bool = option(
        "sequence & packing", False, "Pad every row to `sequence_len` (steady memory use)."
    )

    # ------------------------------------------------------------- training
    micro_batch_size: int = option("training", 1, "Samples (or packed rows) per device step.", ge=1)
    gradient_accumulation_steps: int = option(
        "training", 1, "Micro-steps per optimizer step.", ge=1
    )
    num_epochs: float = option("training", 1.0, "Passes over the training data.", gt=0)
    max_steps: int | None = option(
        "training", None, "Stop after this many optimizer steps (overrides num_epochs).", gt=0
    )
    optimizer: str = option("training", "adamw_torch", "Optimizer: " + ", ".join(OPTIMIZERS) + ".")
    lr_scheduler: str = option(
        "training", "cosine", "Learning-rate schedule: " + ", ".join(LR_SCHEDULERS) + "."
    )
    lr_scheduler_kwargs: dict[str, Any] | None = option(
        "training", None, "Extra arguments for the learning-rate schedule."
    )
    learning_rate: float = option(
        "training", 2e-4, "Peak learning rate (0 runs the steps without changing weights).", ge=0
    )
    warmup_steps: int | None = option("training", None, "Linear warm-up steps.", ge=0)
    warmup_ratio: float | None = option(
        "training", None, "Warm-up as a fraction of all steps.", ge=0, le=1
    )
    weight_decay: float = option("training", 0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = option("training", 1.0, "Gradient clipping norm (0 turns it off).", ge=0)
    adam_beta1: float | None = option("training", None, "Adam beta1.")
    adam_beta2: float | None = option("training", None, "Adam beta2.")
    adam_epsilon: float | None = option("training", None, "Adam epsilon.")
    seed: int = option("training", 42, "Seed for shuffling, packing, dropout and initialization.")
    resume_from_checkpoint: str | None = option(
        "training", None, "Checkpoint folder to resume training from."
    )
    auto_resume_from_checkpoints: bool = option(
        "training", False, "Resume from the newest complete checkpoint in `output_dir`."
    )

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {value!r}; choose one of: {', '.join(OPTIMIZERS)}")
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(
                f"unknown lr_scheduler {value!r}; choose one of: {', '.join(LR_SCHEDULERS)}"
            )
        return value

    def _check_training(self) -> list[tuple[str, str]]:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            return [("warmup_ratio", "warmup_steps and warmup_ratio are exclusive; keep one")]
        return []

    # -------------------------------------------------- evaluation & saving
    output_dir: str = option(
        "evaluation & saving", "./outputs/out", "Where the adapter, logs and checkpoints go."
    )
    val_set_size: float = option(
        "evaluation & saving",
        0.0,
        "Held-out eval set: a fraction (< 1) or a row count (>= 1) of the training data.",
        ge=0,
    )
    eval_steps: int | float | None = option(
        "evaluation & saving",
        None,
        "Evaluate every N steps (a float < 1: fraction of all steps).",
        gt=0,
    )
    evals_per_epoch: int | None = option(
        "evaluation & saving", None, "Evaluate this many times per epoch.", ge=1
    )
    eval_batch_size: int | None = option(
        "evaluation & saving", None, "Eval micro-batch size (default: micro_batch_size).", ge=1
    )
    save_steps: int | float | None = option(
        "evaluation & saving",
        None,
        "Checkpoint every N steps (a float < 1: fraction of all steps).",
        gt=0,
    )
    saves_per_epoch: int | None = option(
        "evaluation & saving", None, "Checkpoint this many times per epoch.", ge=1
    )
    save_total_limit: int | None = option(
        "evaluation & saving", None, "Keep only the newest N checkpoints.", ge=1
    )
    early_stopping_patience: int | None = option(
        "evaluation & saving", None, "Stop after this many evaluations without improvement.", ge=1
    )

    @field_validator("val_set_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"{value} is neither a fraction below 1 nor a whole row count")
        return value

    def _check_evaluation(self) -> list[tuple[str, str]]:
        problems = []
        for steps, per_epoch in (
            ("eval_steps", "evals_per_epoch"),
            ("save_steps", "saves_per_epoch"),
        ):
            if getattr(self, steps) is not None and getattr(self, per_epoch) is not None:
                problems.append((per_epoch, f"{steps} and {per_epoch} are exclusive; keep one"))
        if self.val_set_size == 0 and not self.test_datasets:
            for key in ("eval_steps", "evals_per_epoch", "early_stopping_patience"):
                if getattr(self, key) is not None:
                    problems.append(
                        (
                            key,
                            "there is nothing to evaluate: val_set_size is 0 and no "
                            "test_datasets; set val_set_size (e.g. 0.05) or remove this key",
                        )
                    )
        return problems

    # --------------------------------------------------- precision & memory
    bf16: bool | Literal["auto"] = option(
        "precision & memory",
        "auto",
        "Train in bfloat16: true, false or auto (if the hardware has it).",
    )
    fp16: bool = option("precision & memory", False, "Train in float16 mixed precision (GPU).")
    tf32: bool = option("precision & memory", False, "Allow TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: bool = option(
        "precision & memory", False, "Recompute activations in backward to save memory."
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = option(
        "precision & memory",
        None,
        "Arguments for gradient checkpointing, e.g. {use_reentrant: false}.",
    )

    @field_validator("bf16", "fp16", "tf32", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any, info: Any) -> Any:
        # Axolotl examples write `fp16:` with no value to mean "off" (and `bf16:` for auto).
        if value is None:
            return "auto" if info.field_name == "bf16" else False
        return value

    def _check_precision(self) -> list[tuple[str, str]]:
        if self.bf16 is True and self.fp16:
            return [("fp16", "bf16 and fp16 are exclusive; keep one (bf16 where supported)")]
        return []

    # ---------------------------------------------------------- distributed
    deepspeed: str | dict[str, Any] | None = option(
        "distributed",
        None,
        "DeepSpeed JSON config: a path (e.g. deepspeed_configs/zero2.json) or a mapping.",
    )
    fsdp: list[str] | str | None = option(
        "distributed", None, "FSDP options (not supported by finetune yet; use deepspeed)."
    )
    fsdp_config: dict[str, Any] | None = option(
        "distributed", None, "FSDP settings (not supported by finetune yet; use deepspeed)."
    )
    ddp_timeout: int | None = option(
        "distributed", None, "Seconds a process waits for the others before failing.", ge=1
    )
    ddp_find_unused_parameters: bool | None = option(
        "distributed", None, "DDP's find_unused_parameters (needed by some gradient checkpointing)."
    )

    def _check_distributed(self) -> list[tuple[str, str]]:
        problems = []
        if self.deepspeed and (self.fsdp or self.fsdp_config):
            problems.append(("fsdp", "deepspeed and fsdp are exclusive; keep one"))
        if isinstance(self.deepspeed, str):
            problem = _deepspeed_file_problem(self.deepspeed)
            if problem:
                problems.append(("deepspeed", problem))
        return problems

    # -------------------------------------------------------------- logging
    logging_steps: int = option("logging", 1, "Log metrics every N optimizer steps.", ge=1)
    use_tensorboard: bool = option("logging", False, "Also log to TensorBoard in output_dir/runs.")
    wandb_project: str | None = option(
        "logging", None, "Weights & Biases project (logging to W&B is on only when set)."
    )
    wandb_entity: str | None = option("logging", None, "Weights & Biases entity (team or user).")
    wandb_name: str | None = option("logging", None, "Weights & Biases run name.")
    wandb_mode: Literal["online", "offline", "disabled"] | None = option(
        "logging", None, "Weights & Biases mode."
    )
    wandb_run_id: str | None = option("logging", None, "Weights & Biases run id to resume.")
    mlflow_tracking_uri: str | None = option(
        "logging", None, "MLflow tracking URI (logging to MLflow is on only when set)."
    )
    mlflow_experiment_name: str | None = option("logging", None, "MLflow experiment name.")
    mlflow_run_name: str | None = option("logging", None, "MLflow run name.")

    # ------------------------------------------------------ all the checks
    @model_validator(mode="after")
    def _check_and_resolve(self) -> FinetuneConfig:
        problems = [
            *self._check_model(),
            *self._check_quantization(),
            *self._check_adapter(),
            *self._check_training(),
            *self._check_evaluation(),
            *self._check_precision(),
            *self._check_distributed(),
        ]
        if problems:
            raise Problems(problems)
        # Fill in the values that follow from others, so the resolved config says what runs.
        legacy = self._legacy_attention()
        self.attn_implementation = self.attn_implementation or (legacy[0] if legacy else "sdpa")
        if self.eval_sample_packing is None:
            self.eval_sample_packing = self.sample_packing
        return self


def _known_chat_template(value: str | None) -> str | None:
    if value is not None and value not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(
            f"unknown chat template {value!r}; choose one of: {', '.join(CHAT_TEMPLATE_CHOICES)} "
            "(or give your own with chat_template_jinja)"
        )
    return value


def _deepspeed_file_problem(path: str) -> str | None:
    """Why the DeepSpeed JSON at `path` cannot be used, or None when it can."""
    file = Path(path)
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"file {path} not found; give a path to a DeepSpeed JSON (see deepspeed_configs/)"
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read {path}: {exc}"
    except json.JSONDecodeError as exc:
        return f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    return None


def fields_by_section() -> dict[str, list[str]]:
    """Config key names grouped by their section, in schema order."""
    grouped: dict[str, list[str]] = {section: [] for section in SECTIONS}
    for name, info in FinetuneConfig.model_fields.items():
        grouped[info.json_schema_extra["section"]].append(name)
    return grouped
