"""Chat templates: the built-in `.jinja` files, a custom one, or the tokenizer's own.

The chosen template is written into the saved tokenizer at train time, so inference and the
merged model format prompts exactly as training did.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from finetune.config.paths import is_inline_template
from finetune.errors import ChatTemplateError

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
CHAT_TEMPLATE_CHOICES = ("tokenizer_default", *BUILTIN_TEMPLATES)


def resolve_chat_template(name: str | None, jinja: str | None, tokenizer: Any) -> str | None:
    """The Jinja text of the template to use, or None when the config asks for none.

    `jinja` (a template or a path to one) wins over `name`; `tokenizer_default` takes the
    tokenizer's own template and is an error when it has none.
    """
    if jinja:
        if is_inline_template(jinja):
            return jinja
        try:
            return Path(jinja).read_text(encoding="utf-8")
        except OSError as exc:
            raise ChatTemplateError(
                f"chat_template_jinja: {jinja} is neither a Jinja template nor a readable file "
                f"({exc.strerror})"
            ) from None
    if name is None:
        return None
    if name == "tokenizer_default":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ChatTemplateError(
                "chat_template: tokenizer_default, but the tokenizer has no chat template; "
                f"name one of: {', '.join(BUILTIN_TEMPLATES)} (or set chat_template_jinja)"
            )
        return template if isinstance(template, str) else template.get("default")
    if name not in BUILTIN_TEMPLATES:
        raise ChatTemplateError(
            f"chat_template: unknown template {name!r}; choose one of: "
            + ", ".join(CHAT_TEMPLATE_CHOICES)
        )
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@cache
def compile_template(template: str) -> jinja2.Template:
    """Compile as transformers does (sandboxed, trim_blocks, lstrip_blocks), once per text."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, indent=indent, ensure_ascii=False
    )
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template: line {exc.lineno}: {exc.message}") from None


def render(template: str, messages: list[dict], tokenizer: Any, generation_prompt: bool) -> str:
    """The conversation as text, with the tokenizer's special tokens available to the template."""
    return compile_template(template).render(
        messages=messages,
        add_generation_prompt=generation_prompt,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
        tools=None,
    )


def end_of_turn_marker(template: str, tokenizer: Any) -> str:
    """The text a template puts right after an assistant message (`<|im_end|>`, `<|eot_id|>`).

    Found by rendering a probe conversation, so custom templates work too; falls back to the
    tokenizer's EOS when the template adds nothing there.
    """
    probe = [{"role": "user", "content": "PROBE-Q"}, {"role": "assistant", "content": "PROBE-A"}]
    text = render(template, probe, tokenizer, generation_prompt=False)
    after = text[text.rindex("PROBE-A") + len("PROBE-A") :]
    marker = after.split("\n", 1)[0].strip()
    return marker or (tokenizer.eos_token or "")


def default_system_message(template: str, tokenizer: Any) -> str | None:
    """The system message a template writes when a conversation has none (SmolLM2's and
    Qwen2.5's do), found by rendering with and without one; None when it writes none."""
    user = [{"role": "user", "content": "PROBE-Q"}]
    try:
        plain = render(template, user, tokenizer, generation_prompt=False)
        with_system = render(
            template, [{"role": "system", "content": "PROBE-S"}, *user], tokenizer, False
        )
    except Exception:  # a template that refuses system turns inserts none either
        return None
    head, found, tail = with_system.partition("PROBE-S")
    if found and plain.startswith(head) and plain.endswith(tail):
        inserted = plain[len(head) : len(plain) - len(tail)]
        return inserted or None
    return None


def describe(name: str, template: str, tokenizer: Any) -> str:
    """One line for the preprocess summary: which template, and what it adds by itself."""
    own = " (the tokenizer's own)" if name == "tokenizer_default" else ""
    text = f"chat template {name}{own}"
    inserted = default_system_message(template, tokenizer)
    if inserted:
        text += (
            "; it inserts a default system message into conversations without one: "
            f"{inserted!r} (give your own system turn, or default_system_message, to replace it)"
        )
    return text
