"""What a causal LM's output head computes, and its input captured during the model's own forward.

The chunked loss (finetune.train.linear_cross_entropy) replaces the head's matmul, so it must
know everything between the final hidden states and the logits: the head's weight and bias,
and what the family's forward does to the logits afterwards (a scale, a soft-cap). That is
read from the model class (transformers 5.24's modeling files); a class not listed here, or a
head that is not a plain `nn.Linear` we can multiply by ourselves, keeps the full-logits path.

The hidden states are taken at the head's input, during the usual `model(...)` call, by a
forward pre-hook that hands the head an empty slice instead (it then computes (batch, 0, vocab)
logits). Calling the base decoder directly would also work for a bare model, but it bypasses
the forward of whatever wraps the model: DDP then never prepares its gradient all-reduce (the
ranks silently drift apart) and a PeftModel's or DeepSpeed engine's own forward logic is
skipped. Going through the model's forward keeps every wrapper, every family's argument
conventions (packed-batch `position_ids`/`cu_seq_lens_*`, `use_cache=False`) and the
`logits_to_keep` slicing exactly as they are on the full-logits path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from finetune.errors import TrainingError

# Causal LM classes whose forward ends in `logits = self.lm_head(hidden_states)`, at most with a
# dtype cast or `.contiguous()` (transformers 5.24, read from each modeling file's forward).
PLAIN_HEAD_MODELS = frozenset(
    """
    AXK1ForCausalLM AXK2ForCausalLM AfmoeForCausalLM Apertus1p5TextForCausalLM
    ApertusForCausalLM ArceeForCausalLM AriaTextForCausalLM BailingHybridForCausalLM
    BambaForCausalLM BartForCausalLM BigBirdPegasusForCausalLM BitNetForCausalLM
    BlenderbotForCausalLM BlenderbotSmallForCausalLM BloomForCausalLM BltForCausalLM
    CamembertForCausalLM CodeGenForCausalLM CpmAntForCausalLM CwmForCausalLM
    Data2VecTextForCausalLM DbrxForCausalLM DeepseekV2ForCausalLM DeepseekV32ForCausalLM
    DeepseekV3ForCausalLM DeepseekV4ForCausalLM DiffLlamaForCausalLM DogeForCausalLM
    Dots1ForCausalLM Dots3NoteForCausalLM Emu3ForCausalLM Ernie4_5ForCausalLM
    Ernie4_5_MoeForCausalLM Exaone4ForCausalLM ExaoneMoeForCausalLM FalconForCausalLM
    FalconMambaForCausalLM FlexOlmoForCausalLM FlintForCausalLM FuyuForCausalLM
    GPTBigCodeForCausalLM GPTJForCausalLM GPTNeoForCausalLM GPTNeoXForCausalLM
    Gemma4AssistantForCausalLM Gemma4UnifiedAssistantForCausalLM GemmaForCausalLM
    Glm4ForCausalLM Glm4MoeForCausalLM Glm4MoeLiteForCausalLM GlmForCausalLM
    GlmMoeDsaForCausalLM GptOssForCausalLM HYV3ForCausalLM HYV4ForCausalLM HeliumForCausalLM
    HrmTextForCausalLM HunYuanDenseV1ForCausalLM HunYuanMoEV1ForCausalLM Jais2ForCausalLM
    JambaForCausalLM JetMoeForCausalLM KimiLinearForCausalLM Kolibri1ForCausalLM
    Kosmos2TextForCausalLM Kosmos2_5TextForCausalLM LagunaForCausalLM LaraMiniForCausalLM
    Lfm2ForCausalLM Lfm2MoeForCausalLM Lfm3ForCausalLM Llama4ForCausalLM LlamaForCausalLM
    LongcatFlashForCausalLM MBartForCausalLM Mamba2ForCausalLM MambaForCausalLM
    MarianForCausalLM MellumForCausalLM MiMoV2FlashForCausalLM MiniCPM3ForCausalLM
    MiniMaxForCausalLM MiniMaxM2ForCausalLM MiniMaxM3VLForCausalLM Ministral3ForCausalLM
    MinistralForCausalLM Mistral4ForCausalLM MistralForCausalLM MixtralForCausalLM
    MllamaForCausalLM MoshiForCausalLM MptForCausalLM MvpForCausalLM NemotronForCausalLM
    NemotronHForCausalLM OPTForCausalLM Olmo2ForCausalLM Olmo3ForCausalLM OlmoForCausalLM
    OlmoHybridForCausalLM OlmoeForCausalLM PLBartForCausalLM PegasusForCausalLM
    PersimmonForCausalLM Phi3ForCausalLM Phi4MultimodalForCausalLM PhiForCausalLM
    PhimoeForCausalLM Qwen2ForCausalLM Qwen2MoeForCausalLM Qwen3ForCausalLM Qwen3MoeForCausalLM
    Qwen3NextForCausalLM Qwen3_5ForCausalLM Qwen3_5MoeForCausalLM Qwen4ExpForCausalLM
    RobertaForCausalLM RobertaPreLayerNormForCausalLM SeedOssForCausalLM SmolLM3ForCausalLM
    SolarOpenForCausalLM StableLmForCausalLM Starcoder2ForCausalLM XGLMForCausalLM
    XLMRobertaForCausalLM XLMRobertaXLForCausalLM XmodForCausalLM YoutuForCausalLM
    Zamba2ForCausalLM ZambaForCausalLM ZayaForCausalLM
    """.split()
)


def _final_logit_softcapping(model) -> tuple[float, float | None]:
    return 1.0, model.config.final_logit_softcapping


def _logits_soft_cap(model) -> tuple[float, float | None]:
    return 1.0, model.config.logits_soft_cap


def _logit_scale(model) -> tuple[float, float | None]:
    return float(model.logit_scale), None


def _divided_by_logits_scaling(model) -> tuple[float, float | None]:
    return 1.0 / model.config.logits_scaling, None


def _times_logits_scaling(model) -> tuple[float, float | None]:
    return float(model.config.logits_scaling), None


def _lm_head_multiplier(model) -> tuple[float, float | None]:
    return float(model.model.lm_head_multiplier), None


# Classes whose forward scales or soft-caps the head's output: (scale, softcap) from the model.
TRANSFORMED_HEAD_MODELS: dict[str, Callable[[torch.nn.Module], tuple[float, float | None]]] = {
    # logits = tanh(logits / c) * c, with c = config.final_logit_softcapping (None: no cap)
    **dict.fromkeys(
        """Gemma2ForCausalLM Gemma3ForCausalLM Gemma3nForCausalLM Gemma4ForCausalLM
        Gemma4UnifiedForCausalLM NanoChatForCausalLM VaultGemmaForCausalLM
        BeamForCausalLM""".split(),
        _final_logit_softcapping,
    ),
    "RecurrentGemmaForCausalLM": _logits_soft_cap,
    # logits = logits * self.logit_scale
    **dict.fromkeys(
        """CohereForCausalLM Cohere2ForCausalLM Cohere2MoeForCausalLM
        CohereCompassForCausalLM""".split(),
        _logit_scale,
    ),
    # logits = logits / config.logits_scaling
    **dict.fromkeys(
        """GraniteForCausalLM GraniteSWAForCausalLM GraniteMoeForCausalLM
        GraniteMoeSWAForCausalLM GraniteMoeHybridForCausalLM GraniteMoeSharedForCausalLM""".split(),
        _divided_by_logits_scaling,
    ),
    "HyperCLOVAXForCausalLM": _times_logits_scaling,  # multiplies by the same-named key
    "FalconH1ForCausalLM": _lm_head_multiplier,
}


@dataclass
class OutputHead:
    """The linear map the loss applies itself: final logits = softcap(scale * (h W^T + b))."""

    module: torch.nn.Linear
    scale: float
    softcap: float | None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias


def output_head(model: torch.nn.Module) -> OutputHead | None:
    """The model's output head as a plain linear map plus its known post-processing, or None
    where the loss must keep the full-logits path (reason in each comment below)."""
    causal_lm = _unwrapped(model)
    name = type(causal_lm).__name__
    if name in PLAIN_HEAD_MODELS:
        scale, softcap = 1.0, None
    elif name in TRANSFORMED_HEAD_MODELS:
        scale, softcap = TRANSFORMED_HEAD_MODELS[name](causal_lm)
    else:
        # A family whose forward we have not read (multimodal wrappers, heads with their own
        # post-processing, remote code) may do anything to its logits after the head.
        return None
    head = _module_that_runs(causal_lm.get_output_embeddings())
    # A LoRA/DoRA layer on the head (lora_target_modules: [lm_head]) adds a low-rank update
    # with its own dropout, and transformers' or remote code's Linear subclasses may have a
    # forward of their own: only a plain nn.Linear computes exactly h W^T + b.
    if type(head) is not torch.nn.Linear:
        return None
    # Under DeepSpeed ZeRO-3 (`ds_id`) or FSDP2 (a DTensor) the weight is only whole inside
    # the head's own forward, which this path skips.
    if hasattr(head.weight, "ds_id") or type(head.weight).__name__ == "DTensor":
        return None
    return OutputHead(head, float(scale), None if softcap is None else float(softcap))


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / DeepSpeed's engine (`.module`), torch.compile
    (`._orig_mod`) and a PeftModel (`get_base_model()`)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return model


def _module_that_runs(head: torch.nn.Module | None) -> torch.nn.Module | None:
    """The module that does the head's work: inside PEFT's modules_to_save wrapper, the active
    trainable copy (or the original where no adapter of the wrapper is active)."""
    from peft.utils.other import ModulesToSaveWrapper

    if not isinstance(head, ModulesToSaveWrapper):
        return head
    adapters = head.active_adapters
    if head.disable_adapters or not adapters or adapters[0] not in head.modules_to_save:
        return head.original_module
    return head.modules_to_save[adapters[0]]


@contextmanager
def head_input_taken(head: OutputHead) -> Iterator[list[torch.Tensor]]:
    """Within the block the head computes no logits: its input (the final hidden states at the
    kept positions) is appended to the yielded list and an empty slice goes through instead."""
    taken: list[torch.Tensor] = []

    def take(module, args, kwargs):
        if len(taken) == 1:
            raise TrainingError(
                "the chunked loss expects one call of the output head per forward; this "
                "model calls it more often (run with FINETUNE_LOSS=full_logits)"
            )
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("input")
        taken.append(hidden)
        return (hidden[..., :0, :], *args), kwargs

    handle = head.module.register_forward_pre_hook(take, with_kwargs=True)
    try:
        yield taken
    finally:
        handle.remove()
    if not taken:
        raise TrainingError(
            "the chunked loss found no call of the output head in the model's forward "
            "(run with FINETUNE_LOSS=full_logits)"
        )
