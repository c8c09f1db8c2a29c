"""The prompt format a run trained with, as a structure a runtime template can reproduce.

Most chat formats wrap every message in a fixed head and tail per role (`<|im_start|>user\\n`
... `<|im_end|>\\n`), may add a default system message when the conversation has none (Qwen2.5,
SmolLM2, Llama 3.1's dated header), or fold the system message into the first user turn (Gemma)
or the last one (Mistral), and end with a generation prompt. `TurnFormat` holds those pieces.

For a Jinja chat template they are found by rendering probe conversations with the template
itself, and the result is checked by rendering more conversations both ways. Only *prompts*
matter to a runtime (a conversation that ends with a user message, plus the generation prompt),
so that is what is derived and checked: a template may write a finished conversation
differently (Phi-3 ends it with EOS, Qwen3 gives the last answer a <think> block) as long as
its prompts are fixed turns. A template whose prompts are not is refused, not guessed.
Alpaca-style prompts are built from the strategy's own format strings.

From a `TurnFormat`, modelfile.py writes an Ollama Go template, and `jinja_template` writes a
chat template for the GGUF when the run trained without one (alpaca-style data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from finetune.data import chat_templates
from finetune.errors import ExportError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TurnFormat:
    heads: dict[str, str]  # role -> text before the message's content
    tails: dict[str, str]  # role -> text after it
    generation: str = ""  # after the last message, where the model starts to answer
    prefix: str = ""  # once at the start: a BOS the template writes itself
    default_system: str | None = None  # system content used when the conversation has none
    # Set: the system message is not a turn but goes, followed by this text, into a user turn:
    system_join: str | None = None
    system_into: str = "first"  # that turn: the "first" user message, or the "last" message
    stop: str = ""  # the end-of-turn marker the model emits

    def render(self, messages: list[dict]) -> str:
        """A prompt (a conversation waiting for the next answer), as this format writes it."""
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        parts = [self.prefix]
        if self.system_join is None:
            if system is None and self.default_system is not None:
                parts.append(self.heads["system"] + self.default_system + self.tails["system"])
            chat = messages
        else:
            chat = [m for m in messages if m["role"] != "system"]
        target = 0 if self.system_into == "first" else len(chat) - 1
        for index, message in enumerate(chat):
            role, content = message["role"], message["content"]
            if self.system_join is not None and system and index == target and role == "user":
                content = system + self.system_join + content
            parts.append(self.heads[role] + content + self.tails[role])
        return "".join(parts) + self.generation


@dataclass
class _Renders:
    alone: str  # [user], no generation prompt
    asking: str  # [user], generation prompt
    finished: str  # [user, assistant, user, assistant], no generation prompt
    history: str  # [user, assistant, user], generation prompt
    system_alone: str  # [system, user], generation prompt
    system_history: str  # [system, user, assistant, user], generation prompt


def from_chat_template(template: str, tokenizer) -> TurnFormat:
    """The turn structure of a Jinja chat template's prompts (module doc)."""

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return chat_templates.render(template, messages, tokenizer, generation_prompt)

    s, u1, a1, u2, a2 = (_probe(name) for name in ("s", "u1", "a1", "u2", "a2"))
    try:
        renders = _Renders(
            alone=render(_chat(u1), False),
            asking=render(_chat(u1), True),
            finished=render(_chat(u1, a1, u2, a2), False),
            history=render(_chat(u1, a1, u2), True),
            system_alone=render(_chat(u1, system=s), True),
            system_history=render(_chat(u1, a1, u2, system=s), True),
        )
    except Exception as exc:  # a template that refuses the probe
        raise _cannot(f"probing it failed ({exc})") from None
    stop = chat_templates.end_of_turn_marker(template, tokenizer)
    problem = None
    # The template may write a BOS itself, once, first (a "BOS" that opens every turn, like
    # SmolLM2's <|im_start|>, is part of the turns); and may end a finished conversation with
    # the EOS token (Phi-3). Each reading is checked; the first that holds is the format.
    bos = tokenizer.bos_token or ""
    once = bool(bos) and renders.history.count(bos) == 1
    for prefix in [bos, ""] if once else [""]:
        for ending in dict.fromkeys(("", tokenizer.eos_token or "")):
            try:
                found = _turns_from(renders, prefix, ending, stop)
                _check_against(found, render)
                return found
            except ExportError as exc:
                problem = problem or exc
    raise problem


def _turns_from(r: _Renders, prefix: str, ending: str, stop: str) -> TurnFormat:
    s, u1, a1, u2 = (_probe(name) for name in ("s", "u1", "a1", "u2"))
    alone = _strip_end(r.alone, ending)
    if alone is None or not r.asking.startswith(alone) or not alone.startswith(prefix):
        raise _cannot("the generation prompt is not text added at the end")
    generation = r.asking[len(alone) :]
    tail_user = _pieces(alone, [u1])[1]
    history = _pieces(r.history, [u1, a1, u2])
    tail_assistant = _strip_end(_pieces(r.finished, [u1, a1, u2, _probe("a2")])[4], ending)
    head_assistant = _strip_start(history[1], tail_user)
    head_user = _strip_start(history[2], tail_assistant or "")
    if None in (tail_assistant, head_assistant, head_user) or history[3] != tail_user + generation:
        raise _cannot("its turns are not fixed text around each message")
    default_block = _strip_start(history[0], prefix)
    if default_block is None or not default_block.endswith(head_user):
        raise _cannot("the text before the first message is not fixed")
    default_block = default_block[: len(default_block) - len(head_user)]
    heads = {"user": head_user, "assistant": head_assistant, "system": ""}
    tails = {"user": tail_user, "assistant": tail_assistant, "system": ""}
    found = {"heads": heads, "tails": tails, "generation": generation, "prefix": prefix}

    if s not in r.system_history:
        raise _cannot("it leaves system messages out")
    into_last = r.system_history.index(s) > r.system_history.index(u1)
    before, between = _pieces(r.system_alone, [s, u1])[:2]
    if into_last and not default_block:  # Mistral: the system message opens the last user turn
        between = _pieces(r.system_history, [u1, a1, s, u2])[3]
        return TurnFormat(**found, system_join=between, system_into="last", stop=stop)
    if before == prefix + head_user and not default_block:  # Gemma: it opens the first one
        return TurnFormat(**found, system_join=between, stop=stop)
    if not between.endswith(head_user) or not before.startswith(prefix):
        raise _cannot("its system message is neither a turn nor part of a user turn")
    heads["system"] = before[len(prefix) :]
    tails["system"] = between[: len(between) - len(head_user)]
    default_system = None
    if default_block:
        inner = _strip_start(default_block, heads["system"])
        inner = None if inner is None else _strip_end(inner, tails["system"])
        if inner is None:
            raise _cannot("it adds text that is not a system turn when there is none")
        default_system = inner
    return TurnFormat(**found, default_system=default_system, stop=stop)


def from_prompt_style(system_format: str, turn_format: str, default_system: str, eos: str):
    """An alpaca-style prompt (system + instruction, no input) as turns; the EOS ends a turn."""
    head_system, tail_system = _around(system_format, "{system}", "system_format")
    head_user, tail_user = _around(turn_format, "{instruction}", "the prompt format")
    return TurnFormat(
        heads={"system": head_system, "user": head_user, "assistant": ""},
        tails={"system": tail_system, "user": tail_user, "assistant": eos},
        default_system=default_system or None,
        stop=eos,
    )


def jinja_template(turns: TurnFormat) -> str:
    """A Jinja chat template (the dialect of transformers and llama.cpp) writing `turns`, for
    runs that trained without a chat template (alpaca-style data); `eos_token` is the template
    variable, and with `add_generation_prompt` false it writes the conversation as trained."""

    def lit(text: str) -> str:  # a JSON string is a valid Jinja string literal
        return json.dumps(text, ensure_ascii=False)

    def turn(role: str) -> str:
        tail = "eos_token" if turns.tails[role] == turns.stop else lit(turns.tails[role])
        return f"{{{{ {lit(turns.heads[role])} + message['content'] + {tail} }}}}"

    default = ""
    if turns.default_system is not None:
        block = turns.heads["system"] + turns.default_system + turns.tails["system"]
        default = (
            "{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{{{ {lit(block)} }}}}{{%- endif -%}}"
        )
    branches = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} message['role'] == {lit(role)} -%}}{turn(role)}"
        for i, role in enumerate(ROLES)
    )
    return (
        f"{default}{{%- for message in messages -%}}{branches}{{%- endif -%}}{{%- endfor -%}}"
        f"{{%- if add_generation_prompt -%}}{{{{ {lit(turns.generation)} }}}}{{%- endif -%}}"
    )


# Prompts the derived format must write exactly as the template does (roles alternate, as
# Gemma's and Mistral's templates demand).
PROBE_PROMPTS = [
    [("user", "Hello there!")],
    [("user", "What is 2 + 2?"), ("assistant", "4."), ("user", "And 3 + 3?")],
    [("system", "Be brief."), ("user", "Name a color.")],
    [
        ("system", "Be kind."),
        ("user", "Hi"),
        ("assistant", "Hello! How can I help?"),
        ("user", "Tell me a joke."),
    ],
    [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e f")],
]


def _check_against(found: TurnFormat, render) -> None:
    for conversation in PROBE_PROMPTS:
        messages = [{"role": role, "content": text} for role, text in conversation]
        if found.render(messages) != render(messages, True):
            raise _cannot("its prompts differ from fixed turns on a test conversation")


def _probe(name: str) -> str:
    return f"\ue000{name}\ue001"  # private-use characters: in no template or vocabulary text


def _chat(*contents: str, system: str | None = None) -> list[dict]:
    roles = [("user", "assistant")[i % 2] for i in range(len(contents))]
    messages = [{"role": role, "content": text} for role, text in zip(roles, contents, strict=True)]
    return ([{"role": "system", "content": system}] if system else []) + messages


def _pieces(text: str, markers: list[str]) -> list[str]:
    """The text around each marker, in order: len(markers) + 1 pieces."""
    pieces, rest = [], text
    for marker in markers:
        before, found, rest = rest.partition(marker)
        if not found:
            raise _cannot("a message's content does not appear in it verbatim")
        pieces.append(before)
    return [*pieces, rest]


def _strip_start(text: str, start: str) -> str | None:
    return text[len(start) :] if text.startswith(start) else None


def _strip_end(text: str, end: str) -> str | None:
    return text[: len(text) - len(end)] if text.endswith(end) else None


def _around(fmt: str, placeholder: str, what: str) -> tuple[str, str]:
    head, found, tail = fmt.partition(placeholder)
    if not found or "{" in head + tail:
        raise ExportError(
            f"{what} {fmt!r}: export needs exactly one {placeholder} and no other placeholder"
        )
    return head, tail


def _cannot(reason: str) -> ExportError:
    return ExportError(
        f"the run's chat template cannot be written as fixed turns: {reason}. The GGUF keeps the "
        "template itself (llama.cpp --jinja uses it); write the Ollama TEMPLATE by hand"
    )
