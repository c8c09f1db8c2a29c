"""Fold a trained LoRA / rsLoRA / DoRA adapter into its base model, one checkpoint shard at a time.

The merge never builds the model. It reads the base checkpoint tensor by tensor, adds the
adapter's update to the weights it targets (in fp32), and writes each output shard as soon as it
is complete, so memory holds one output shard (at most one input shard, or `max_shard_size`)
plus the adapter, whatever the model's size. Everything is written into a hidden folder next to
the target and renamed into place only when complete (finetune/fs.py), so an interrupted merge
leaves nothing that looks like a finished model (a killed one leaves a hidden `.NAME.tmp-...`
folder, safe to delete).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from finetune.dtypes import FLOAT_DTYPES
from finetune.fs import staged_folder
from finetune.merge.adapter_file import align_adapter, read_adapter
from finetune.merge.checkpoint import (
    checkpoint_names,
    read_base_config,
    read_checkpoint_index,
    read_model_layout,
    resolve_base,
    resolve_dtype,
)
from finetune.merge.plan import plan_output
from finetune.merge.verify import check_merged_model, fits_in_memory_twice
from finetune.merge.weights import Nf4Settings, merge_lora_shard
from finetune.merge.write import (
    copy_tokenizer,
    match_file_modes,
    refuse_occupied_target,
    refuse_target_over_inputs,
    shard_file_name,
    write_generation_config,
    write_model_config,
    write_shard_index,
)


@dataclass
class MergeReport:
    """What a merge did; `max_abs_logit_diff` and `greedy_agreement` are None when not verified."""

    output_dir: Path
    dtype: str
    tensors_merged: int
    tensors_replaced: int
    tensors_nf4_roundtripped: int
    tensors_written: int
    shards: int
    total_size: int
    seconds: float = 0.0
    max_abs_logit_diff: float | None = None
    greedy_agreement: float | None = None


def merge_adapter(
    base: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    nf4_roundtrip: bool = False,
    nf4_compute_dtype: str | None = None,
    nf4_double_quant: bool = True,
    verify: bool | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], object] = print,
) -> MergeReport:
    """Write `base` with the adapter in `adapter_dir` folded in to `output_dir`.

    `base` is a local folder (safetensors or pickled `.bin` shards, the latter read with
    `weights_only=True`) or a Hugging Face Hub id. The result is safetensors shards plus an
    index, `config.json` (output dtype, no `quantization_config`), `generation_config.json` and
    the tokenizer (the adapter folder's when it has one, else the base's). It loads with
    `AutoModelForCausalLM.from_pretrained` without peft.

    `dtype` (bf16, fp16, fp32) defaults to the base checkpoint's. Input shards are never joined,
    and are split at `max_shard_size` ("5GB", "500MB", or bytes): peak memory is about one
    output shard plus the adapter. A non-empty `output_dir` is refused unless `force`, and even
    then is replaced only once the new model is complete (and verified).

    QLoRA: by default the adapter is merged into the original full-precision base. The adapter
    was trained against the nf4-rounded weights, though, so this model differs a little from
    the one training saw (while keeping the base's full precision). `nf4_roundtrip=True` first
    passes every weight bitsandbytes quantized during training (the transformer blocks' linear
    layers; not embeddings, lm_head or norms) through nf4 and back, in `nf4_compute_dtype`
    (default: the output dtype) with `nf4_double_quant` as in training, so the merged model
    computes what training saw at the price of the nf4 rounding error. The output is never
    re-quantized.

    `trust_remote_code` lets transformers run the checkpoint's own model code (to read its
    layout and to verify), as in training; off unless the run had it.

    `verify` loads base+adapter with peft and the merged model, and compares logits and greedy
    continuations of a few token-id prompts; None verifies when both fit comfortably in RAM.
    Raises MergeError, leaving any existing `output_dir` untouched, when anything is wrong.
    """
    started = time.perf_counter()
    target = Path(output_dir)
    refuse_occupied_target(target, force)
    adapter = read_adapter(Path(adapter_dir))
    base_dir = resolve_base(base, revision)
    refuse_target_over_inputs(target, [base_dir, adapter.folder])
    config = read_base_config(base_dir)
    checkpoint = read_checkpoint_index(base_dir)
    out_dtype = resolve_dtype(dtype, config, checkpoint)
    layout = read_model_layout(base_dir, trust_remote_code)
    names = checkpoint_names(checkpoint, layout)
    adapter = align_adapter(adapter, names)
    plan = plan_output(checkpoint, adapter, layout, names, FLOAT_DTYPES[out_dtype], max_shard_size)
    nf4 = None
    if nf4_roundtrip:
        compute_dtype = resolve_dtype(nf4_compute_dtype or out_dtype, config, checkpoint)
        nf4 = Nf4Settings.for_layout(layout, names, FLOAT_DTYPES[compute_dtype], nf4_double_quant)
    report = MergeReport(
        output_dir=target,
        dtype=out_dtype,
        tensors_merged=len(adapter.updates),
        tensors_replaced=len(adapter.saved_modules),
        tensors_nf4_roundtripped=len(nf4.weights) if nf4 else 0,
        tensors_written=sum(len(tensors) for _, tensors in plan.shards),
        shards=len(plan.shards),
        total_size=plan.total_size,
    )
    log(
        f"merging {adapter.weights_file} into {base_dir}: {report.tensors_merged} adapted weights,"
        f" {report.tensors_replaced} saved modules, {out_dtype}, {report.shards} shards"
    )

    with staged_folder(target, replace=True) as staging:
        for index, (shard, tensors) in enumerate(plan.shards):
            name = shard_file_name(index, len(plan.shards))
            merged = merge_lora_shard(shard, tensors, adapter, nf4)
            save_file(merged, staging / name, metadata={"format": "pt"})
            log(f"wrote {name} ({len(merged)} tensors)")
            del merged  # free this shard before reading the next
        write_shard_index(plan, staging)
        write_model_config(config, plan.config_changes, staging)
        match_file_modes(staging)
        write_generation_config(adapter.folder, base_dir, staging)
        copy_tokenizer(adapter.folder, base_dir, staging)
        if verify or (verify is None and fits_in_memory_twice(plan)):
            report.max_abs_logit_diff, report.greedy_agreement = check_merged_model(
                base_dir, adapter.folder, staging, nf4, out_dtype, target, log, trust_remote_code
            )
    report.seconds = time.perf_counter() - started
    log(f"merged model written to {target} in {report.seconds:.1f} s")
    return report
