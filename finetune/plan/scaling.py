"""From measured steps of 1- and 2-layer copies to the whole model: layers repeat, so every
per-step quantity (tensor bytes, seconds, FLOPs) is a part outside the layers, linear in the
tokens of a micro-batch, plus the number of layers times one layer's part."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.plan.measure import StepMeasure


@dataclass
class Model:
    """The measured steps, fitted: tensor bytes, FLOPs and seconds for L layers and T tokens."""

    layers: int
    hidden_size: int
    dtype_bytes: int
    short: StepMeasure  # 1 layer, T/2 tokens
    one: StepMeasure  # 1 layer, T tokens
    two: StepMeasure  # 2 layers, T tokens

    def _per_layer(self, attr: str) -> float:
        return getattr(self.two, attr) - getattr(self.one, attr)

    def weights(self) -> int:
        return int(self.one.weight_bytes + (self.layers - 1) * self._per_layer("weight_bytes"))

    def trainable(self) -> int:
        return int(
            self.one.trainable_bytes + (self.layers - 1) * self._per_layer("trainable_bytes")
        )

    def parameters(self) -> int:
        return int(self.one.parameters + (self.layers - 1) * self._per_layer("parameters"))

    def linear_bytes(self) -> int:
        return int(self.one.linear_bytes + (self.layers - 1) * self._per_layer("linear_bytes"))

    def _activations(self, step: StepMeasure) -> float:
        return step.peak_bytes - step.weight_bytes - 3 * step.trainable_bytes

    def layer_activations_per_token(self) -> float:
        """One decoder layer's activation bytes per token (measured at T tokens)."""
        diff = self._activations(self.two) - self._activations(self.one)
        return max(0.0, diff / self.one.tokens)

    def outside(self, tokens: int) -> float:
        """Activation bytes outside the layers (embeddings, head, loss), linear in tokens."""
        per_layer = self.layer_activations_per_token()
        at_short = self._activations(self.short) - per_layer * self.short.tokens
        at_one = self._activations(self.one) - per_layer * self.one.tokens
        slope = (at_one - at_short) / (self.one.tokens - self.short.tokens)
        return max(0.0, at_one + slope * (tokens - self.one.tokens))

    def activations(self, tokens: int, checkpointing: bool | None = None) -> int:
        """All activation bytes at the step's peak; `checkpointing` True estimates what
        gradient checkpointing would leave when the measured steps ran without it (each
        layer keeps its input; one layer's activations exist at a time)."""
        per_layer = self.layer_activations_per_token() * tokens
        if checkpointing:
            kept = self.hidden_size * self.dtype_bytes * tokens
            return int(self.outside(tokens) + self.layers * kept + per_layer)
        return int(self.outside(tokens) + self.layers * per_layer)

    def seconds(self, tokens: int) -> float:
        """The step's FLOPs (counted, so exact to scale) at the FLOP rate the three measured
        steps achieved together. Scaling their seconds directly, as the bytes are, fails on a
        busy machine: a 2-layer step that happens to run faster than the 1-layer one gives a
        negative layer time (a plan of "0 s per epoch")."""
        steps = (self.short, self.one, self.two)
        flops, seconds = sum(s.flops for s in steps), sum(s.seconds for s in steps)
        if flops <= 0 or seconds <= 0:
            return self._linear("seconds", tokens)
        return self.flops(tokens) * seconds / flops

    def flops(self, tokens: int) -> float:
        return self._linear("flops", tokens)

    def _linear(self, attr: str, tokens: int) -> float:
        """A per-step quantity for the whole model: the layers' part scales with tokens, the
        rest is linear in tokens between the two 1-layer steps."""
        per_layer = self._per_layer(attr) / self.one.tokens
        at_short = getattr(self.short, attr) - per_layer * self.short.tokens
        at_one = getattr(self.one, attr) - per_layer * self.one.tokens
        slope = (at_one - at_short) / (self.one.tokens - self.short.tokens)
        outside = at_one + slope * (tokens - self.one.tokens)
        return max(0.0, outside + self.layers * per_layer * tokens)
