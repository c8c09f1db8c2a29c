"""`finetune plan`: a run's peak memory, disk and time, predicted before anything is downloaded
or trained, with the one change that makes it fit when it does not.

The memory comes from three measured steps (finetune.plan.measure) of shortened copies of the
model: 1 layer at T/2 and T tokens, 2 layers at T tokens (T: the run's tokens per micro-batch,
at most `MEASURE_TOKENS`). Every live tensor is counted, so the figures hold whatever the
architecture, adapter, quantization, attention or loss; layers repeat, so

    peak tensors(L, T) = weights(L) + 3 x trainable(L) + outside(T) + L x per_layer x T

where outside(T) (embeddings, head, loss) is linear in T between the two 1-layer steps, and
per_layer is the second layer's activation bytes per token.

On this CPU a run that keeps freed memory in glibc's heap (`finetune.machine.cpu_allocator_mode`:
no checkpointing, unsharded) holds more than its live tensors: the heap fragments, and kernels
allocate scratch memory no tensor shows. `bench/plan_accuracy.py` (SmolLM2-135M: LoRA, QLoRA,
DoRA, 1,024 and 2,048 tokens, large tensors in huge pages as the CLI sets them) puts that excess
at `CPU_HEAP_BASE` plus `CPU_HEAP_PER_HIDDEN` hidden-state-sized blocks per layer per token,
fitted by least squares over the three adapters. The adapters differ around that line: QLoRA's
excess grows faster with tokens (bitsandbytes' dequantized weights), LoRA's and DoRA's slower;
each run left out of the fit is still predicted within 12%, except QLoRA at 2,048 tokens (19%
under). A run that gives freed blocks back (checkpointing, ZeRO-3) holds its live tensors and
little more. A quantized run on CPU also holds the full-precision weights it quantized from.
That the excess scales with the hidden size of other models is an assumption one model cannot
test. On a GPU the same tensors
are counted; the CUDA context and allocator slack are estimates, stated as such, until a GPU
run checks them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from finetune.config import FinetuneConfig
from finetune.plan.gpus import ASSUMED_MFU, HEADROOM, Gpu
from finetune.plan.measure import measure_step
from finetune.plan.scaling import Model

MEASURE_TOKENS = 1024
CPU_HEAP_BASE = 320 * 10**6  # bytes (see above)
CPU_HEAP_PER_HIDDEN = 4.1  # hidden-state-sized blocks per layer per token (see above)
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace: an estimate
CUDA_ALLOCATOR_FACTOR = 1.1  # caching allocator rounding and fragmentation: an estimate
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, double-quantized scales


@dataclass
class Breakdown:
    """Peak memory of one process, in bytes."""

    weights: int  # the base model as loaded (4/8-bit where quantized), sharded where sharded
    adapter: int  # the trained weights
    gradients: int
    optimizer: int  # AdamW's two moments
    activations: int  # saved activations and temporaries at the step's peak, loss included
    allocator: int  # CPU: memory glibc holds beyond live tensors; GPU: allocator slack
    runtime: int  # CPU: the process before the model (Python, torch); GPU: the CUDA context

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass
class Plan:
    device: str
    budget_bytes: int
    breakdown: Breakdown
    tokens_per_micro_batch: int
    activation_bytes_per_token: float  # all layers, at the run's setting of checkpointing
    seconds_per_step: float | None
    time_basis: str
    tokens_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    seconds_per_epoch: float | None = None
    checkpoint_bytes: int = 0
    merged_bytes: int = 0
    suggestion: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_memory_bytes(self) -> int:
        return self.breakdown.total

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.budget_bytes

    def as_json(self) -> dict:
        return {
            "device": self.device,
            "peak_memory_bytes": self.peak_memory_bytes,
            "budget_bytes": self.budget_bytes,
            "fits": self.fits,
            "breakdown": asdict(self.breakdown),
            "tokens_per_micro_batch": self.tokens_per_micro_batch,
            "activation_bytes_per_token": round(self.activation_bytes_per_token),
            "tokens_per_epoch": self.tokens_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "seconds_per_step": self.seconds_per_step,
            "seconds_per_epoch": self.seconds_per_epoch,
            "time_basis": self.time_basis,
            "checkpoint_bytes": self.checkpoint_bytes,
            "merged_bytes": self.merged_bytes,
            "suggestion": self.suggestion,
            "notes": self.notes,
        }


def make_plan(
    config: FinetuneConfig,
    gpu: Gpu | None = None,
    num_gpus: int = 1,
    log=print,
    budget_bytes: int | None = None,
    memory_only: bool = False,
) -> Plan:
    """The plan for `config` on this machine's CPU, or on `num_gpus` of `gpu`; `budget_bytes`
    replaces the memory it must fit in (default: the GPU's, or the RAM available now).
    `memory_only`: memory and disk, no time (what `train` prints at its start: 2 of the 5 steps
    per measured model)."""
    from finetune.model.load import compute_dtype_name, load_model_config, text_config

    config = _for_device(config, gpu)
    runtime = _own_resident_bytes() if gpu is None else CUDA_CONTEXT_BYTES
    model_config = load_model_config(config)
    text = text_config(model_config)
    packed = bool(config.sample_packing)
    tokens = config.micro_batch_size * config.sequence_len
    measured = min(tokens, MEASURE_TOKENS)
    measured -= measured % 2
    log(f"measuring 3 training steps of a 1- and 2-layer {text.model_type} ({measured} tokens)")
    steps = [
        measure_step(config, model_config, layers, count, packed, timed=not memory_only)
        for layers, count in ((1, measured // 2), (1, measured), (2, measured))
    ]
    dtype_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[compute_dtype_name(config)]
    model = Model(text.num_hidden_layers, text.hidden_size, dtype_bytes, *steps)
    breakdown = _breakdown(config, model, tokens, runtime, gpu, num_gpus)
    plan = Plan(
        device=_device_name(gpu, num_gpus),
        budget_bytes=budget_bytes or _budget(gpu),
        breakdown=breakdown,
        tokens_per_micro_batch=tokens,
        activation_bytes_per_token=breakdown.activations / tokens,
        seconds_per_step=None,
        time_basis="",
    )
    if not memory_only:
        _add_time(plan, config, model, gpu, num_gpus)
    _add_disk(plan, config, model)
    if not plan.fits:
        plan.suggestion = _suggest(config, model, tokens, runtime, gpu, num_gpus, plan)
    if gpu is not None:
        plan.notes.append(
            "GPU figures: tensors measured here on CPU; CUDA context "
            f"({CUDA_CONTEXT_BYTES / 2**30:.1f} GiB) and allocator slack "
            f"({CUDA_ALLOCATOR_FACTOR - 1:.0%} of activations) are estimates"
        )
    return plan


def _for_device(config: FinetuneConfig, gpu: Gpu | None) -> FinetuneConfig:
    """The config as it would run: `bf16: auto` decided for the GPU named (or this CPU)."""
    from finetune.machine import resolve_for_machine

    if gpu is None:
        return resolve_for_machine(config)
    if config.bf16 == "auto":
        config = config.model_copy(update={"bf16": gpu.bf16, "fp16": not gpu.bf16})
    return config


def _breakdown(
    config: FinetuneConfig, model: Model, tokens: int, runtime: int, gpu, num_gpus: int
) -> Breakdown:
    trainable = model.trainable()
    weights = model.weights() - trainable
    activations = model.activations(tokens)
    optimizer, gradients = 2 * trainable, trainable
    stage = _zero_stage(config)
    if num_gpus > 1 and stage >= 1:
        optimizer //= num_gpus
    if num_gpus > 1 and stage >= 2:
        gradients //= num_gpus
    if num_gpus > 1 and (stage >= 3 or config.uses_fsdp()):
        one_layer = (model.weights() - model.one.weight_bytes) // max(1, model.layers - 1)
        weights = weights // num_gpus + one_layer  # a gathered layer at a time
    return Breakdown(
        weights=int(weights),
        adapter=int(trainable),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=int(activations),
        allocator=_allocator(config, model, tokens, activations, gpu),
        runtime=int(runtime),
    )


def _allocator(config: FinetuneConfig, model: Model, tokens: int, activations: int, gpu) -> int:
    """Memory beyond the live tensors: the CPU heap's excess (and, quantizing on CPU, the
    full-precision weights), or the CUDA caching allocator's slack."""
    from finetune.machine import cpu_allocator_mode

    if gpu is not None:
        return int((CUDA_ALLOCATOR_FACTOR - 1) * activations)
    heap = 0  # "give back" (checkpointing, ZeRO-3): every large block is returned when freed
    if cpu_allocator_mode(config) == "keep":
        heap = CPU_HEAP_BASE + CPU_HEAP_PER_HIDDEN * (
            model.layers * model.hidden_size * model.dtype_bytes * tokens
        )
    if config.load_in_4bit or config.load_in_8bit:
        heap += max(0, model.parameters() * model.dtype_bytes - model.weights())
    return int(heap)


def _zero_stage(config: FinetuneConfig) -> int:
    deepspeed = config.deepspeed
    if not deepspeed:
        return 0
    if isinstance(deepspeed, dict):
        return int((deepspeed.get("zero_optimization") or {}).get("stage", 0))
    name = os.path.basename(str(deepspeed))
    for stage in (3, 2, 1):
        if f"zero{stage}" in name:
            return stage
    return 0


def _add_time(plan: Plan, config: FinetuneConfig, model: Model, gpu, num_gpus: int) -> None:
    tokens = plan.tokens_per_micro_batch
    if gpu is None:
        plan.seconds_per_step = model.seconds(tokens) * config.gradient_accumulation_steps
        plan.time_basis = "the step's FLOPs at the rate the shortened models reached on this CPU"
    else:
        flops = model.flops(tokens) * config.gradient_accumulation_steps
        plan.seconds_per_step = flops / (gpu.tflops_16bit * 1e12 * ASSUMED_MFU)
        plan.time_basis = (
            f"FLOPs counted here / ({gpu.tflops_16bit:g} TFLOPs x {ASSUMED_MFU:.0%} assumed "
            "utilization)"
        )
    data = _prepared_lengths(config)
    if data is None:
        plan.notes.append(
            "tokens and time per epoch: the data is not prepared yet; run `finetune preprocess "
            "CONFIG` first"
        )
        return
    from finetune.data.packing import BatchPlan, steps_per_epoch

    lengths, packed = data
    batches = BatchPlan(
        lengths,
        config.micro_batch_size,
        config.sequence_len,
        packed=packed,
        seed=config.seed,
        rank=0,
        world_size=num_gpus,
    )
    plan.tokens_per_epoch = int(sum(lengths))
    plan.steps_per_epoch = steps_per_epoch(batches, config.gradient_accumulation_steps)
    slots = [
        sum(lengths[i] for i in group) if packed else len(group) * max(lengths[i] for i in group)
        for group in batches
    ]
    if gpu is None:
        seconds = sum(model.seconds(n) for n in slots)
    else:
        seconds = sum(model.flops(n) for n in slots) / (gpu.tflops_16bit * 1e12 * ASSUMED_MFU)
    plan.seconds_per_epoch = float(seconds)


def _prepared_lengths(config: FinetuneConfig):
    """The prepared training samples' lengths, when the cache holds them; and packing."""
    from finetune.data.prepare import cached_prepared
    from finetune.model.load import load_tokenizer

    try:
        prepared = cached_prepared(config, load_tokenizer(config))
    except Exception:  # noqa: BLE001 (the plan stands without the data)
        return None
    if prepared is None:
        return None
    return list(prepared.train["length"]), bool(config.sample_packing)


def _add_disk(plan: Plan, config: FinetuneConfig, model: Model) -> None:
    trainable = model.trainable()
    checkpoint = trainable * 4  # adapter + AdamW's two moments + the master copy's size again
    kept = config.save_total_limit or 1
    plan.checkpoint_bytes = int(checkpoint * kept + trainable)  # the final adapter too
    plan.merged_bytes = int(model.parameters() * (4 if not config.bf16 else 2))


def _suggest(config, model: Model, tokens: int, runtime: int, gpu, num_gpus: int, plan) -> str:
    """The first single change that brings the peak under the budget."""
    budget = plan.budget_bytes
    base = plan.breakdown

    def total_with(
        activations: int, weights: int | None = None, tokens_: int = tokens, run=config
    ) -> int:
        w = base.weights if weights is None else weights
        extra = _allocator(run, model, tokens_, activations, gpu)
        return int(
            w + base.adapter + base.gradients + base.optimizer + activations + extra + base.runtime
        )

    gb = 1e9
    if not config.gradient_checkpointing:
        checkpointed = config.model_copy(update={"gradient_checkpointing": True})
        peak = total_with(model.activations(tokens, checkpointing=True), run=checkpointed)
        if peak <= budget:
            return f"gradient_checkpointing: true (about {peak / gb:.1f} GB)"
    for name, value in (
        ("micro_batch_size", config.micro_batch_size),
        ("sequence_len", config.sequence_len),
    ):
        smaller = value // 2
        while smaller >= 1 and (name != "sequence_len" or smaller >= 128):
            fewer = tokens * smaller // value
            peak = total_with(model.activations(fewer), tokens_=fewer)
            if peak <= budget:
                return f"{name}: {smaller} (about {peak / gb:.1f} GB)"
            smaller //= 2
    # On CPU quantizing saves nothing at the peak: the full-precision weights are read first.
    if gpu is not None and config.adapter == "lora" and not config.load_in_4bit:
        linear = model.linear_bytes()
        per_weight = linear / max(1, model.dtype_bytes)
        weights = base.weights - linear + int(per_weight * NF4_BYTES_PER_WEIGHT)
        peak = total_with(base.activations, weights)
        if peak <= budget:
            return f"adapter: qlora with load_in_4bit: true (about {peak / gb:.1f} GB)"
    if gpu is not None and num_gpus > 1 and _zero_stage(config) < 3:
        weights = base.weights // num_gpus
        peak = total_with(base.activations, weights)
        if peak <= budget:
            return f"deepspeed: zero3 (about {peak / gb:.1f} GB per GPU)"
    return "no single change fits it: combine the ones above, or use a larger device"


def _device_name(gpu: Gpu | None, num_gpus: int) -> str:
    if gpu is None:
        return "this machine's CPU (RAM)"
    return f"{num_gpus} x {gpu.name} ({gpu.memory_gib:g} GiB each)"


def _budget(gpu: Gpu | None) -> int:
    if gpu is not None:
        return int(gpu.memory_gib * 2**30 * HEADROOM)
    return _available_ram()


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _own_resident_bytes() -> int:
    """This process's resident memory now, with what training imports loaded: what a training
    process holds before its model."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
