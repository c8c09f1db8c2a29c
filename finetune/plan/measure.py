"""Measured, not guessed: one training step of shortened copies of the run's model.

The base model's architecture with 1 and 2 decoder layers (random weights, nothing
downloaded) is loaded through the training path itself (dtype, quantization, attention, gradient
checkpointing, the run's adapter), and trains two steps on a batch of the run's shape through the
training loss and an AdamW optimizer. A dispatch mode (`LiveTensorBytes`) counts the bytes of
every tensor alive at the step's peak (weights, adapter, gradients, optimizer state,
activations, temporaries), and the clock and torch's FLOP counter time and count the step.
Layers repeat, so the full model's figures follow from the copies (finetune.plan.estimate).
"""

from __future__ import annotations

import copy
import tempfile
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from finetune.config import FinetuneConfig
from finetune.model.load import text_config


@dataclass(frozen=True)
class StepMeasure:
    layers: int
    tokens: int  # token slots in one micro-batch
    peak_bytes: int  # every live tensor at the step's peak (LiveTensorBytes)
    weight_bytes: int  # the loaded model's parameters and buffers, adapter included
    trainable_bytes: int  # the parameters the optimizer updates
    parameters: int  # parameter count of the base model (adapter excluded)
    linear_bytes: int  # the decoder layers' linear weights as loaded (what 4-bit would shrink)
    seconds: float  # one training step (forward, backward, optimizer), the faster of two
    flops: int  # one training step (torch.utils.flop_counter)


def shortened(model_config, layers: int):
    """The same architecture with `layers` decoder layers."""
    short = copy.deepcopy(model_config)
    text = text_config(short)
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types[:layers])
    return short


def measure_step(
    config: FinetuneConfig,
    model_config,
    layers: int,
    tokens: int,
    packed: bool,
    timed: bool = True,
) -> StepMeasure:
    """One step of the run's shape on a `layers`-layer copy of its model; `timed` False counts
    its memory only (two steps instead of five: no FLOP count, no timing)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from finetune.model.load import load_model, torch_dtype
    from finetune.train.attention import PER_SAMPLE_ATTENTION, register_attention
    from finetune.train.attention_choice import choose_attention
    from finetune.train.loss import kept_token_loss

    short = shortened(model_config, layers)
    attention = choose_attention(config, short)
    if attention.implementation == PER_SAMPLE_ATTENTION:
        register_attention()
    with tempfile.TemporaryDirectory(prefix="finetune-plan-") as folder:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            short, dtype=torch_dtype(config), trust_remote_code=config.trust_remote_code
        )
        model.save_pretrained(folder)
        del model
        run = config.model_copy(
            update={"base_model": folder, "base_model_config": None, "tokenizer_config": None}
        )
        tokenizer = _Vocabulary(short)
        model = load_model(run, tokenizer, attn_implementation=attention.implementation)
    if config.adapter:
        from finetune.model.adapters import attach_adapter

        model = attach_adapter(model, config, log=lambda message: None)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-6)
    batch = _batch(config, short, tokens, packed)
    weight_bytes = sum(t.numel() * t.element_size() for t in _tensors(model))
    trainable_bytes = sum(p.numel() * p.element_size() for p in trained)
    parameters = _base_parameter_count(model, config)
    linear_bytes = _layer_linear_bytes(model)

    def step() -> None:
        loss, _, _ = kept_token_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tracker = LiveTensorBytes()
    for tensor in _tensors(model):
        tracker.track(tensor)
    with tracker:
        step()
        step()
    peak = tracker.peak
    if not timed:
        return StepMeasure(
            layers, tokens, peak, weight_bytes, trainable_bytes, parameters, linear_bytes, 0.0, 0
        )
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return StepMeasure(
        layers,
        tokens,
        peak,
        weight_bytes,
        trainable_bytes,
        parameters,
        linear_bytes,
        min(seconds),
        int(counter.get_total_flops()),
    )


def _layer_linear_bytes(model) -> int:
    total = 0
    for name, module in model.named_modules():
        if hasattr(module, "base_layer"):
            continue  # peft's wrapper: its base_layer is counted
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")
        if linear and ".layers." in f".{name}" and "lora_" not in name:
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() == 2:
                total += weight.numel() * weight.element_size()
    return total


def _base_parameter_count(model, config: FinetuneConfig) -> int:
    """Parameters of the base model as a full-precision checkpoint would hold them (a 4-bit
    weight stores two values per byte; the adapter's own weights are not counted)."""
    count = 0
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        quant_state = getattr(param, "quant_state", None)
        count += int(quant_state.shape.numel()) if quant_state is not None else param.numel()
    return count


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of every tensor storage alive, and their peak, while the mode is on: each
    storage an operation returns is counted once, until it is freed (a weak reference's
    callback). Autograd's saved tensors and the backward's outputs pass through it too."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = (size, weakref.ref(storage, lambda _, key=key: self._free(key)))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        size, _ = self._live.pop(key, (0, None))
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self.track(value)
        return out


def _tensors(model):
    yield from model.parameters()
    yield from model.buffers()


class _Vocabulary:
    """What load_model asks of a tokenizer: its length (the embedding rows)."""

    def __init__(self, model_config):
        self.size = text_config(model_config).vocab_size

    def __len__(self) -> int:
        return self.size


def _batch(config: FinetuneConfig, model_config, tokens: int, packed: bool) -> dict:
    """A micro-batch of the run's shape, every token trained (the most the loss can cost)."""
    from finetune.data.packing import collate_packed, collate_padded

    vocab = text_config(model_config).vocab_size
    generator = torch.Generator().manual_seed(0)
    rows = config.micro_batch_size
    width = tokens // rows if not packed else tokens
    if packed:
        # samples of a quarter of sequence_len, as packing fills a row with several
        length = max(1, config.sequence_len // 4)
        lengths = [length] * (tokens // length) + ([tokens % length] if tokens % length else [])
    else:
        lengths = [width] * rows
    samples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": ids})
    if packed:
        return collate_packed(samples, 0)
    return collate_padded(samples, 0)
