"""The config schema: one pydantic model, grouped by section.

Longer than our ~400-line guide on purpose: the schema stays in one place (one model, each
section's fields beside the checks that read them), so a reader finds every key here.

This file is the single source of truth for config keys, their types, defaults and help
text; the JSON Schema (`finetune validate --schema`) and the README's config reference are
generated from it. Key names and meanings follow Axolotl. Each cross-field check sits in the
section whose keys it reads; all of them report together, so a user sees every problem at once.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Prompt strategies (`type:`) are one module each in finetune/data/strategies/; a mapping
# (`type: {field_instruction: ...}`) defines a custom alpaca-like format instead.
from finetune.config.axolotl import (
    AXOLOTL_CHAT_TEMPLATES,
    AXOLOTL_DATASET_TYPE_HINTS,
    AXOLOTL_OWN_OPTIMIZERS,
)
from finetune.config.vocabulary import (
    CHAT_TEMPLATE_ALIASES,
    CHAT_TEMPLATES,
    DATASET_TYPE_ALIASES,
    DATASET_TYPES,
)

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
    "hub",
)

# The HF Trainer's optimizers (transformers 5.24 `OptimizerNames`, minus the XLA/NPU ones).
OPTIMIZERS = tuple(
    """
    adamw_torch adamw_torch_fused adafactor adamw_anyprecision adamw_torch_4bit adamw_torch_8bit
    ademamix sgd adagrad adamw_bnb_8bit adamw_8bit ademamix_8bit lion_8bit lion_32bit
    paged_adamw_32bit paged_adamw_8bit paged_ademamix_32bit paged_ademamix_8bit paged_lion_32bit
    paged_lion_8bit rmsprop rmsprop_bnb rmsprop_bnb_8bit rmsprop_bnb_32bit galore_adamw
    galore_adamw_8bit galore_adafactor galore_adamw_layerwise galore_adamw_8bit_layerwise
    galore_adafactor_layerwise lomo adalomo grokadamw schedule_free_radam schedule_free_adamw
    schedule_free_sgd apollo_adamw apollo_adamw_layerwise stable_adamw
    """.split()
)

# The HF Trainer's learning-rate schedules (transformers 5.24 `SchedulerType`).
LR_SCHEDULERS = tuple(
    """
    linear cosine cosine_with_restarts polynomial constant constant_with_warmup inverse_sqrt
    reduce_lr_on_plateau cosine_with_min_lr cosine_warmup_with_min_lr warmup_stable_decay
    """.split()
)

TrainOnEos = Literal["turn", "all", "last", "none"]


def unknown_choice(what: str, value: str, choices) -> str:
    """`unknown WHAT 'x' (did you mean 'y'?); choose one of: ...`"""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {value!r}{hint}; choose one of: {', '.join(choices)}"


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
    field_thinking: str = Field(
        "reasoning_content",
        description="Message key holding an assistant turn's reasoning, when the data has it.",
    )
    split_thinking: bool = Field(
        False,
        description="Take <think>...</think> (or <reasoning>...) out of assistant contents "
        "into the reasoning the template writes.",
    )
    template_thinking_key: str = Field(
        "reasoning_content",
        description="Message key the chat template reads reasoning from (Qwen3: its default).",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        return _known_chat_template(value)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str | DatasetFormat) -> str | DatasetFormat:
        if isinstance(value, str):
            value = DATASET_TYPE_ALIASES.get(value, value)
        if isinstance(value, str) and value not in DATASET_TYPES:
            hint = AXOLOTL_DATASET_TYPE_HINTS.get(value.split(".")[0].split(":")[0])
            if hint:
                raise ValueError(f"type {value} is not supported: {hint}")
            raise ValueError(unknown_choice("type", value, DATASET_TYPES))
        return value

    @property
    def type_name(self) -> str:
        """The type as messages name it: its name, or "custom format" for a mapping."""
        return self.type if isinstance(self.type, str) else "custom format"


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

    @field_validator("attn_implementation", mode="before")
    @classmethod
    def _known_attention(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(
                f"{value} is an attention backend finetune does not offer; use sdpa (the "
                "default), eager, or flash_attention_2 on a CUDA GPU"
            )
        return value

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

    eot_tokens: list[str] | None = option(
        "datasets",
        None,
        "Tokens that end a turn, trained after each trained turn per train_on_eos (default: the "
        "template's end-of-turn marker, else the EOS token).",
    )
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
        "sequence & packing", 512, "Maximum tokens per sample (and per packed row).", ge=16
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
    gradient_accumulation_steps: int | None = option(
        "training",
        None,
        "Micro-steps per optimizer step (default 1, or batch_size / micro_batch_size).",
        ge=1,
    )
    batch_size: int | None = option(
        "training",
        None,
        "Axolotl's older way to give the batch: samples per optimizer step per process; sets "
        "gradient_accumulation_steps = batch_size / micro_batch_size.",
        ge=1,
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
        "training",
        False,
        "Resume from the newest complete checkpoint of an unfinished run in `output_dir`.",
    )
    cosine_min_lr_ratio: float | None = option(
        "training",
        None,
        "With lr_scheduler: cosine, decay to this fraction of learning_rate instead of 0.",
        gt=0,
        lt=1,
    )

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value in AXOLOTL_OWN_OPTIMIZERS:
            raise ValueError(
                f"{value} is Axolotl's own optimizer, which finetune does not have; use one of "
                "the HF Trainer's, e.g. adamw_torch, adamw_torch_fused or adamw_8bit"
            )
        if value not in OPTIMIZERS:
            raise ValueError(unknown_choice("optimizer", value, OPTIMIZERS))
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(unknown_choice("lr_scheduler", value, LR_SCHEDULERS))
        return value

    def _check_training(self) -> list[tuple[str, str]]:
        problems = []
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            problems.append(
                ("warmup_ratio", "warmup_steps and warmup_ratio are exclusive; keep one")
            )
        if self.batch_size is not None:
            steps = self.gradient_accumulation_steps
            if steps is not None and steps * self.micro_batch_size != self.batch_size:
                problems.append(
                    (
                        "batch_size",
                        "batch_size and gradient_accumulation_steps disagree (batch_size sets "
                        "gradient_accumulation_steps = batch_size / micro_batch_size); keep one",
                    )
                )
            elif self.batch_size % self.micro_batch_size:
                problems.append(
                    (
                        "batch_size",
                        f"{self.batch_size} is not a multiple of micro_batch_size "
                        f"{self.micro_batch_size}; gradient_accumulation_steps = batch_size / "
                        "micro_batch_size must be whole",
                    )
                )
        if self.cosine_min_lr_ratio is not None and self.lr_scheduler != "cosine":
            problems.append(
                (
                    "cosine_min_lr_ratio",
                    f"works with lr_scheduler: cosine (got {self.lr_scheduler}); for other "
                    "schedules give their own lr_scheduler_kwargs",
                )
            )
        return problems

    # -------------------------------------------------- evaluation & saving
    output_dir: str = option(
        "evaluation & saving", "./model-out", "Where the adapter, logs and checkpoints go."
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
        "evaluation & saving", None, "Evaluate this many times per epoch (0: never).", ge=0
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
        "evaluation & saving",
        None,
        "Checkpoint this many times per epoch (0: only the final save).",
        ge=0,
    )
    save_total_limit: int | None = option(
        "evaluation & saving", None, "Keep only the newest N checkpoints.", ge=1
    )
    early_stopping_patience: int | None = option(
        "evaluation & saving", None, "Stop after this many evaluations without improvement.", ge=1
    )
    loss_watchdog_threshold: float | None = option(
        "evaluation & saving",
        None,
        "Stop training when the logged loss stays above this for loss_watchdog_patience logs.",
        gt=0,
    )
    loss_watchdog_patience: int = option(
        "evaluation & saving", 3, "Logs in a row above loss_watchdog_threshold that stop.", ge=1
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
        if self.val_set_size and self.test_datasets:
            problems.append(
                (
                    "val_set_size",
                    "val_set_size and test_datasets are exclusive: test_datasets are the eval "
                    "set; keep one",
                )
            )
        # eval_steps / evals_per_epoch without eval data are skipped with a warning, as Axolotl
        # skips them (config/load.py); early stopping without evaluations cannot work.
        if not self.has_eval_data() and self.early_stopping_patience is not None:
            problems.append(
                (
                    "early_stopping_patience",
                    "there is nothing to evaluate: val_set_size is 0 and no test_datasets; set "
                    "val_set_size (e.g. 0.05) or remove this key",
                )
            )
        return problems

    def has_eval_data(self) -> bool:
        return bool(self.val_set_size or self.test_datasets)

    # --------------------------------------------------- precision & memory
    bf16: bool | Literal["auto"] = option(
        "precision & memory",
        "auto",
        "Train in bfloat16: true, false or auto (if the hardware has it).",
    )
    fp16: bool | None = option(
        "precision & memory",
        None,
        "Train in float16 mixed precision (GPU); unset: used where bf16 is auto and the GPU "
        "lacks bf16.",
    )
    tf32: bool | Literal["auto"] = option(
        "precision & memory", "auto", "Allow TF32 matmuls: true, false or auto (Ampere+ GPUs)."
    )
    gradient_checkpointing: bool | Literal["offload"] = option(
        "precision & memory",
        False,
        "Recompute activations in backward to save memory (non-reentrant; Axolotl's default is "
        "reentrant). offload: also park each layer's input in pinned CPU memory (CUDA only).",
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = option(
        "precision & memory",
        None,
        "Arguments for gradient checkpointing, e.g. {use_reentrant: false}.",
    )

    @field_validator("bf16", "tf32", mode="before")
    @classmethod
    def _null_means_auto(cls, value: Any) -> Any:
        # Axolotl examples write `bf16:` with no value to mean the default, auto.
        return "auto" if value is None else value

    def _check_precision(self) -> list[tuple[str, str]]:
        if self.bf16 is True and self.fp16:
            return [("fp16", "bf16 and fp16 are exclusive; keep one (bf16 where supported)")]
        return []

    # ---------------------------------------------------------- distributed
    deepspeed: str | dict[str, Any] | None = option(
        "distributed",
        None,
        "DeepSpeed JSON config: a path, a bundled one by name (zero1, zero2, zero3, "
        "zero3_offload) or a mapping.",
    )
    fsdp_version: Literal[1, 2] | None = option(
        "distributed",
        None,
        "2: shard with FSDP2 through Accelerate (CUDA GPUs). Unset with fsdp_config: 1, as in "
        "Axolotl; finetune refuses FSDP1.",
    )
    fsdp_config: dict[str, Any] | None = option(
        "distributed",
        None,
        "FSDP settings, with or without Axolotl's `fsdp_` prefix: offload_params, "
        "cpu_ram_efficient_loading, auto_wrap_policy, transformer_layer_cls_to_wrap, "
        "min_num_params, state_dict_type, activation_checkpointing, reshard_after_forward.",
    )
    fsdp: list[str] | str | None = option(
        "distributed",
        None,
        "Axolotl's older FSDP switch, e.g. [full_shard, auto_wrap]; with fsdp_version: 2, "
        "shard_grad_op means reshard_after_forward: false and offload means offload_params.",
    )
    ddp_timeout: int | None = option(
        "distributed", None, "Seconds a process waits for the others before failing.", ge=1
    )
    ddp_find_unused_parameters: bool | None = option(
        "distributed", None, "DDP's find_unused_parameters (needed by some gradient checkpointing)."
    )

    @field_validator("fsdp_config")
    @classmethod
    def _fsdp_config_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _normalized_fsdp_config(value)

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_options(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split()
        if isinstance(value, list):
            for option_name in value:
                if option_name not in FSDP_LEGACY_OPTIONS:
                    raise ValueError(
                        unknown_choice("fsdp option", option_name, FSDP_LEGACY_OPTIONS)
                    )
        return value or None

    def uses_fsdp(self) -> bool:
        """FSDP is on when fsdp_config is given (even empty) or the legacy fsdp list says
        something, as in Axolotl."""
        return bool(self.fsdp) or self.fsdp_config is not None

    def fsdp_setting(self, key: str, default: Any = None) -> Any:
        """One FSDP2 setting from fsdp_config (prefix stripped), or `default`."""
        return (self.fsdp_config or {}).get(key, default)

    def _check_distributed(self) -> list[tuple[str, str]]:
        problems = []
        if self.deepspeed and self.uses_fsdp():
            problems.append(("fsdp", "deepspeed and fsdp are exclusive; keep one"))
        inner = self.fsdp_setting("version")
        if inner is not None and self.fsdp_version is not None and inner != self.fsdp_version:
            problems.append(
                (
                    "fsdp_version",
                    f"{self.fsdp_version}, but fsdp_config says fsdp_version: {inner}; keep one "
                    "(at the top level)",
                )
            )
        if (self.fsdp_version or inner) and not self.uses_fsdp():
            problems.append(
                (
                    "fsdp_config",
                    "required with fsdp_version: FSDP is switched on by fsdp_config (as in "
                    "Axolotl), e.g. fsdp_config: {auto_wrap_policy: TRANSFORMER_BASED_WRAP}",
                )
            )
        if (self.fsdp_version or inner) == 2:
            problems += self._check_fsdp2()
        return problems

    def _check_fsdp2(self) -> list[tuple[str, str]]:
        """What FSDP2 cannot do, said before anything loads (FSDP1 is refused at `train`)."""
        problems = []
        for option_name in self.fsdp or []:
            if option_name in FSDP1_ONLY_STRATEGIES:
                problems.append(
                    (
                        "fsdp",
                        f"{option_name} is an FSDP1 sharding strategy; FSDP2 shards fully "
                        "(full_shard) or keeps weights gathered between forward and backward "
                        "(shard_grad_op)",
                    )
                )
        strategy = self.fsdp_setting("sharding_strategy")
        if strategy is not None and strategy not in FSDP2_RESHARD:
            problems.append(
                (
                    "fsdp_config.sharding_strategy",
                    f"{strategy} is FSDP1-only; with fsdp_version: 2 use FULL_SHARD or "
                    "SHARD_GRAD_OP (or reshard_after_forward: true / false)",
                )
            )
        reshard = self.fsdp_setting("reshard_after_forward")
        if strategy in FSDP2_RESHARD and reshard is not None and reshard != FSDP2_RESHARD[strategy]:
            problems.append(
                (
                    "fsdp_config.reshard_after_forward",
                    f"{str(reshard).lower()}, but sharding_strategy: {strategy} means "
                    f"{str(FSDP2_RESHARD[strategy]).lower()}; keep one",
                )
            )
        if self.fsdp_setting("state_dict_type") == "LOCAL_STATE_DICT":
            problems.append(
                (
                    "fsdp_config.state_dict_type",
                    "LOCAL_STATE_DICT is FSDP1-only; use FULL_STATE_DICT (the default)",
                )
            )
        policy = self.fsdp_setting("auto_wrap_policy")
        if policy == "SIZE_BASED_WRAP" and self.fsdp_setting("min_num_params") is None:
            problems.append(
                (
                    "fsdp_config.min_num_params",
                    "required with auto_wrap_policy: SIZE_BASED_WRAP (parameters a module needs "
                    "to be sharded on its own), e.g. 100000000",
                )
            )
        if self.fsdp_setting("activation_checkpointing") and (
            self.gradient_checkpointing == "offload"
        ):
            problems.append(
                (
                    "gradient_checkpointing",
                    "offload and fsdp_config.activation_checkpointing both checkpoint the "
                    "layers; keep one",
                )
            )
        return problems

    # -------------------------------------------------------------- logging
    logging_steps: int = option("logging", 1, "Log metrics every N optimizer steps.", ge=1)
    use_tensorboard: bool = option("logging", False, "Also log to TensorBoard in output_dir/runs.")
    use_wandb: bool = option(
        "logging", False, "Log to Weights & Biases (also on whenever wandb_project is set)."
    )
    wandb_project: str | None = option(
        "logging", None, "Weights & Biases project; setting it turns W&B logging on."
    )
    wandb_entity: str | None = option("logging", None, "Weights & Biases entity (team or user).")
    wandb_name: str | None = option("logging", None, "Weights & Biases run name.")
    wandb_mode: Literal["online", "offline", "disabled"] | None = option(
        "logging", None, "Weights & Biases mode."
    )
    wandb_run_id: str | None = option("logging", None, "Weights & Biases run id to resume.")
    use_mlflow: bool = option(
        "logging",
        False,
        "Log to MLflow (also on whenever mlflow_experiment_name or mlflow_tracking_uri is set).",
    )
    mlflow_tracking_uri: str | None = option(
        "logging", None, "MLflow tracking URI; setting it turns MLflow logging on."
    )
    mlflow_experiment_name: str | None = option(
        "logging", None, "MLflow experiment name; setting it turns MLflow logging on."
    )
    mlflow_run_name: str | None = option("logging", None, "MLflow run name.")

    def wandb_enabled(self) -> bool:
        return self.use_wandb or bool(self.wandb_project)

    def mlflow_enabled(self) -> bool:
        return self.use_mlflow or bool(self.mlflow_experiment_name or self.mlflow_tracking_uri)

    def run_name(self) -> str | None:
        """The Trainer's one run name: wandb_name when W&B logs, else mlflow_run_name (Axolotl)."""
        if self.wandb_enabled() and self.wandb_name:
            return self.wandb_name
        return self.mlflow_run_name if self.mlflow_enabled() else None

    # ------------------------------------------------------------------ hub
    hub_model_id: str | None = option(
        "hub",
        None,
        "Hugging Face Hub repo (owner/name) that `finetune push` uploads to; nothing is "
        "uploaded during training.",
    )
    hub_strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] = option(
        "hub",
        "end",
        "What `finetune push --what adapter` uploads with the final adapter: end and every_save "
        "nothing more, checkpoint the newest checkpoint-N, all_checkpoints every checkpoint-N.",
    )
    hub_private_repo: bool | None = option(
        "hub",
        None,
        "Create the Hub repo private (true) or public (false); unset: the Hub's default.",
    )

    @field_validator("hub_model_id")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        from finetune.hub import HUB_ID

        if value is not None and not HUB_ID.match(value):
            raise ValueError(f"{value!r} is not a Hub repo id; write owner/name")
        return value

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
        if self.gradient_accumulation_steps is None:
            batch = self.batch_size
            self.gradient_accumulation_steps = batch // self.micro_batch_size if batch else 1
        if self.uses_fsdp():
            # Axolotl's rule: fsdp_version may sit in fsdp_config; absent, it is FSDP1.
            settings = dict(self.fsdp_config or {})
            self.fsdp_version = self.fsdp_version or settings.pop("version", None) or 1
            settings.pop("version", None)
            self.fsdp_config = settings
        return self


def _known_chat_template(value: str | None) -> str | None:
    value = CHAT_TEMPLATE_ALIASES.get(value, value)
    if value is None or value in CHAT_TEMPLATE_CHOICES:
        return value
    if value in AXOLOTL_CHAT_TEMPLATES:
        raise ValueError(
            f"{value} is an Axolotl chat template finetune does not ship; use tokenizer_default "
            "(the model's own template) or give the template with chat_template_jinja"
        )
    raise ValueError(
        unknown_choice("chat template", value, CHAT_TEMPLATE_CHOICES)
        + " (or give your own with chat_template_jinja)"
    )


def fields_by_section() -> dict[str, list[str]]:
    """Config key names grouped by their section, in schema order."""
    grouped: dict[str, list[str]] = {section: [] for section in SECTIONS}
    for name, info in FinetuneConfig.model_fields.items():
        grouped[info.json_schema_extra["section"]].append(name)
    return grouped


# FSDP (fsdp_config, fsdp): Axolotl's keys, read from its FSDPConfig (axolotl 067b021c), named
# without the `fsdp_` prefix that Axolotl strips (and accepts) too.
FSDP_SETTINGS: dict[str, Any] = {
    "version": (1, 2),
    "activation_checkpointing": bool,
    "offload_params": bool,
    "cpu_ram_efficient_loading": bool,
    "auto_wrap_policy": ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP"),
    "transformer_layer_cls_to_wrap": (str, list),
    "min_num_params": int,
    "state_dict_type": ("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"),
    "final_state_dict_type": ("FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"),
    "reshard_after_forward": bool,
    "cpu_offload_pin_memory": (True,),
    "mixed_precision_policy": (),  # refused: precision follows bf16 / fp16
    # FSDP1's: sharding_strategy maps onto reshard_after_forward under FSDP2; the others tune
    # FSDP1 only, and Axolotl's FSDP2 drops them too.
    "sharding_strategy": (
        "FULL_SHARD",
        "SHARD_GRAD_OP",
        "NO_SHARD",
        "HYBRID_SHARD",
        "_HYBRID_SHARD_ZERO2",
    ),
    "limit_all_gathers": bool,
    "sync_module_states": bool,
    "use_orig_params": bool,
    "forward_prefetch": bool,
    "backward_prefetch": ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"),
}
FSDP2_RESHARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}
FSDP_LEGACY_OPTIONS = (
    "full_shard",
    "shard_grad_op",
    "hybrid_shard",
    "hybrid_shard_zero2",
    "no_shard",
    "offload",
    "auto_wrap",
)
FSDP1_ONLY_STRATEGIES = ("hybrid_shard", "hybrid_shard_zero2", "no_shard")


def _normalized_fsdp_config(raw: dict[str, Any]) -> dict[str, Any]:
    """fsdp_config with Axolotl's `fsdp_` prefixes stripped and every value checked."""
    settings: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for written, value in raw.items():
        name = str(written).removeprefix("fsdp_")
        where = f"fsdp_config.{written}"
        if name in settings and settings[name] != value:
            problems.append((where, "given twice (with and without fsdp_), differently"))
            continue
        if name not in FSDP_SETTINGS:
            close = difflib.get_close_matches(name, list(FSDP_SETTINGS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((where, f"unknown key{hint}"))
            continue
        if name == "cpu_offload_pin_memory" and value is False:
            problems.append((where, "false is not supported: offloaded parameters are pinned"))
            continue
        if name == "mixed_precision_policy" and value is not None:
            problems.append((where, "is not supported: precision follows bf16 / fp16"))
            continue
        if name == "min_num_params" and isinstance(value, int) and value < 1:
            problems.append((where, "should be at least 1"))
            continue
        if name == "transformer_layer_cls_to_wrap" and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if value is not None and not _fsdp_value_fits(FSDP_SETTINGS[name], value):
            problems.append((where, f"should be {_fsdp_kind(FSDP_SETTINGS[name])} (got {value!r})"))
            continue
        settings[name] = value
    if problems:
        raise Problems(problems)
    return {name: value for name, value in settings.items() if value is not None}


def _fsdp_value_fits(kind: Any, value: Any) -> bool:
    if isinstance(value, bool) and kind is not bool and kind != (True,):
        return False  # True == 1: not a version, not a count
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == (str, list):
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    return value in kind


def _fsdp_kind(kind: Any) -> str:
    if kind is bool:
        return "true or false"
    if kind is int:
        return "an integer"
    if kind == (str, list):
        return "a layer class name or a list of them, e.g. LlamaDecoderLayer"
    return "one of " + ", ".join(str(choice) for choice in kind)
