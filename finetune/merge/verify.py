"""Checking the merged model against peft's own base + adapter: logits and greedy continuations
on a few prompts, with tolerances per output dtype."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from finetune.errors import MergeError
from finetune.merge.plan import MergePlan
from finetune.merge.weights import Nf4Settings

# Allowed max |logit difference| between base+adapter and the merged model, relative to
# max(1, largest |reference logit|). An fp32 merge differs only by summation order; bf16 and
# fp16 round each merged weight once more than the unmerged forward does.
VERIFY_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}

# Against a 4-bit reference, bitsandbytes' CPU/GPU kernels add their own rounding on top.
NF4_VERIFY_TOLERANCE = 5e-2


def fits_in_memory_twice(plan: MergePlan) -> bool:
    """Whether base+adapter and the merged model, both in fp32, fit in half the free memory."""
    import psutil

    fp32_bytes = sum(math.prod(t.shape) * 4 for _, tensors in plan.shards for t in tensors)
    return 2 * fp32_bytes < 0.5 * psutil.virtual_memory().available


def check_merged_model(
    base_dir: Path,
    adapter_folder: Path,
    merged_dir: Path,
    nf4: Nf4Settings | None,
    dtype: str,
    target: Path,
    log: Callable[[str], object],
    trust_remote_code: bool = False,
) -> tuple[float, float]:
    """Compare the merged model (in `merged_dir`, staged for `target`) with peft's
    base+adapter on a few prompts: (max |logit difference|, share of greedy agreement).

    With nf4, the reference is the adapter on a 4-bit load of the base, as in training.
    Raises MergeError when the difference is more than `dtype` explains.
    """
    from peft import PeftModel  # only here: a merged model must not need peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.dtypes import keep_4bit_layers_in_compute_dtype

    quantization = None
    if nf4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=nf4.double_quant,
            bnb_4bit_compute_dtype=nf4.compute_dtype,
        )
    remote = {"trust_remote_code": trust_remote_code}
    reference = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, quantization_config=quantization, **remote
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, **remote)
    merged = merged.eval()
    vocab_size = merged.get_input_embeddings().num_embeddings
    if reference.get_input_embeddings().num_embeddings != vocab_size:  # tokens were added
        reference.resize_token_embeddings(vocab_size, mean_resizing=False)
    keep_4bit_layers_in_compute_dtype(reference)  # the computation the adapter trained on
    reference = PeftModel.from_pretrained(reference, adapter_folder).eval()

    # Token ids work for every model, with or without a tokenizer.
    prompts = torch.randint(0, vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(prompts).logits
        diff = (merged(prompts).logits - expected).abs().max().item()
        same = greedy_tokens(reference, prompts) == greedy_tokens(merged, prompts)
    agreement = same.all(dim=1).float().mean().item()
    tolerance = NF4_VERIFY_TOLERANCE if nf4 else VERIFY_TOLERANCE[dtype]
    allowed = tolerance * max(1.0, expected.abs().max().item())
    log(
        f"verified: max |logit difference| {diff:.3g} (allowed {allowed:.3g}), greedy "
        f"continuations agree on {agreement:.0%} of {len(prompts)} prompts"
    )
    if not diff <= allowed:  # `not <=` also catches NaN
        raise MergeError(
            f"the merged model's logits differ from base + adapter by {diff:.3g}, more than the "
            f"{allowed:.3g} allowed for {dtype}; {target} was left unchanged"
        )
    return diff, agreement


def greedy_tokens(model: torch.nn.Module, prompts: torch.Tensor, steps: int = 8) -> torch.Tensor:
    ids = prompts
    for _ in range(steps):
        next_ids = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, prompts.shape[1] :]
