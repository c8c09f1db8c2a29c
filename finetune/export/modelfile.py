"""An Ollama Modelfile whose TEMPLATE writes prompts exactly as training did.

The TEMPLATE is a Go template over Ollama's `.Messages` (each with `.Role` and `.Content`), built
from the run's `TurnFormat`: every message between its role's head and tail, the default system
message when the conversation has none, the system message folded into the first user turn
(Gemma) or the last message (Mistral) where the format does that, and the generation prompt at
the end. It uses no `{{-` trim markers, so every byte outside the actions is written as is.
Go templates have no `trim`: a template that trims contents (Gemma, Llama 3) gets them as given,
which differs from training only for contents with leading or trailing whitespace.

A BOS token the chat template writes as text is left out when the GGUF says the runtime adds one
(`tokenizer.ggml.add_bos_token`), as Ollama's runner does; written as text too it would be there
twice. `PARAMETER stop` is the end-of-turn marker, so generation stops where training's turns
ended.
"""

from __future__ import annotations

import json

from finetune.errors import ExportError
from finetune.export.chat_format import TurnFormat

RAW_TEMPLATE = "{{ .Prompt }}"


def go_template(turns: TurnFormat, runtime_adds_bos: bool) -> str:
    """The Ollama TEMPLATE for `turns` (module doc)."""
    head, tail, folded = turns.heads, turns.tails, turns.system_join is not None
    parts = [_text("" if runtime_adds_bos else turns.prefix)]
    content = "{{ .Content }}"
    loop, after = "{{ range .Messages }}", ""
    if folded:  # the system message goes into a user turn: the first, or the last message
        parts.append(
            '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}'
            "{{ $system = .Content }}{{ end }}{{ end }}"
        )
        if turns.system_into == "first":
            parts.append("{{ $first := true }}")
            condition = "$first"
            after = '{{ if ne .Role "system" }}{{ $first = false }}{{ end }}'
        else:
            loop = "{{ range $i, $_ := .Messages }}"
            condition = "eq (len (slice $.Messages $i)) 1"
        user_content = (
            f"{{{{ if {condition} }}}}{{{{ if $system }}}}{{{{ $system }}}}"
            + _text(turns.system_join)
            + "{{ end }}{{ end }}"
            + content
        )
    else:
        if turns.default_system is not None:
            default = head["system"] + turns.default_system + tail["system"]
            parts.append(
                '{{ $system := false }}{{ range .Messages }}{{ if eq .Role "system" }}'
                "{{ $system = true }}{{ end }}{{ end }}"
                "{{ if not $system }}" + _text(default) + "{{ end }}"
            )
        user_content = content
    roles = ("user", "assistant") if folded else ("system", "user", "assistant")
    branches = [
        ("{{ if" if i == 0 else "{{ else if")
        + f' eq .Role "{role}" }}}}'
        + _text(head[role])
        + (user_content if role == "user" else content)
        + _text(tail[role])
        for i, role in enumerate(roles)
    ]
    parts.append(loop + "".join(branches) + "{{ end }}" + after + "{{ end }}")
    parts.append(_text(turns.generation))
    return "".join(parts)


def modelfile_text(
    gguf_file: str, template: str, stops: list[str], system: str | None, source: str
) -> str:
    """The Modelfile: FROM the GGUF next to it, TEMPLATE, stop parameters, default system."""
    for text in [template, *(system or "",)]:
        if '"""' in text:
            raise ExportError('the prompt format contains """, which a Modelfile cannot quote')
    lines = [
        f"# Written by `finetune export` for {source}. Build it with:",
        "#   ollama create NAME -f Modelfile",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{template}"""',
    ]
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops if stop]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def _text(literal: str) -> str:
    if "{{" in literal or "}}" in literal:
        raise ExportError(
            f"the prompt format's text {literal!r} contains {{{{ or }}}}, which an Ollama "
            "template cannot hold as plain text"
        )
    return literal
