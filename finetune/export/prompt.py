"""Which prompt format the run trained with, read from its config and its saved tokenizer.

- `chat_template` datasets: the Jinja template saved with the run's tokenizer (train writes the
  template it used into output_dir), verbatim; its end-of-turn marker is the stop token, and the
  GGUF's EOS, unless the template writes the tokenizer's own EOS somewhere else (Phi-3 ends a
  finished conversation with it): then EOS stays, and the marker is the EOT token, which
  llama.cpp also stops at.
- alpaca-style datasets: the strategy's own format strings (finetune/data/strategies/alpaca.py,
  or the user-defined `type:` mapping), as turns; the GGUF gets a Jinja template writing them,
  since the tokenizer's own template (if any) is not what the run trained on. The EOS token ends
  the answer, as in training.
- `completion` / `input_output`: raw text, no template.

When datasets use several formats, the first dataset's is exported, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from finetune.config import DatasetFormat, FinetuneConfig
from finetune.data import chat_templates
from finetune.data.strategies import alpaca
from finetune.errors import ExportError
from finetune.export.chat_format import (
    PROBE_PROMPTS,
    TurnFormat,
    from_chat_template,
    from_prompt_style,
    jinja_template,
)

RAW_TYPES = ("completion", "input_output")


@dataclass
class PromptFormat:
    description: str
    chat_template: str | None  # the Jinja template the GGUF carries
    turns: TurnFormat | None  # for the Modelfile; None with `turns_problem` or for raw text
    turns_problem: ExportError | None
    stop: str  # the token text that ends the model's turn
    eos: str  # the token text the GGUF declares as EOS
    chat: bool  # rows were tokenized without the tokenizer's own BOS/EOS (the template's job)


def prompt_format(config: FinetuneConfig, tokenizer, log) -> PromptFormat:
    types = [dataset.type_name for dataset in config.datasets]
    if len(set(types)) > 1:
        log(
            f"warning: the datasets use several prompt formats ({', '.join(dict.fromkeys(types))});"
            f" the export writes the first one's, {types[0]}"
        )
    kind = config.datasets[0].type
    eos = tokenizer.eos_token or ""
    if kind == "chat_template":
        return _chat_template_format(tokenizer)
    if isinstance(kind, DatasetFormat):
        turns = from_prompt_style(kind.system_format, kind.no_input_format, kind.system_prompt, eos)
        return _alpaca_format("custom prompt format", turns)
    if kind in alpaca.STYLES:
        style = alpaca.STYLES[kind]
        turns = from_prompt_style(
            style.system_format, style.turn_no_input_format, style.system_no_input, eos
        )
        return _alpaca_format(f"{kind} prompt", turns)
    if kind in RAW_TYPES:
        return PromptFormat(f"{kind} (raw text)", None, None, None, eos, eos, chat=False)
    raise ExportError(f"datasets[0].type {kind!r}: export does not know this prompt format")


def _chat_template_format(tokenizer) -> PromptFormat:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ExportError(
            "the run trained on chat_template data, but its saved tokenizer has no chat template; "
            "was output_dir written by `finetune train`?"
        )
    try:
        turns, problem = from_chat_template(template, tokenizer), None
    except ExportError as exc:
        turns, problem = None, exc
    stop = chat_templates.end_of_turn_marker(template, tokenizer)
    eos = stop if _same_text_with_eos(template, tokenizer, stop) else tokenizer.eos_token
    return PromptFormat("the run's chat template", template, turns, problem, stop, eos, chat=True)


def _same_text_with_eos(template: str, tokenizer, eos: str) -> bool:
    """Whether the template writes the same conversations when `eos_token` is `eos`."""
    renamed = SimpleNamespace(bos_token=tokenizer.bos_token, eos_token=eos)
    for conversation in PROBE_PROMPTS:
        messages = [{"role": role, "content": text} for role, text in conversation]
        messages.append({"role": "assistant", "content": "The answer."})
        for generation_prompt in (False, True):
            try:
                ours = chat_templates.render(template, messages, renamed, generation_prompt)
                theirs = chat_templates.render(template, messages, tokenizer, generation_prompt)
            except Exception:  # a template that refuses a probe judges nothing
                continue
            if ours != theirs:
                return False
    return True


def _alpaca_format(description: str, turns: TurnFormat) -> PromptFormat:
    return PromptFormat(
        description, jinja_template(turns), turns, None, turns.stop, turns.stop, chat=False
    )
