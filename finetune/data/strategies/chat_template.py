"""`chat_template`: conversations rendered with a chat template; only trained turns keep labels.

Which characters are trained is found in the *rendered text* (each message's content, then the
template's end-of-turn marker right after it), and tokens are labelled from their character
offsets. Tokenizers merge text across turn boundaries, so tokenizing turns separately would give
different tokens from the ones inference sees; this way the tokens are exactly those of the
whole conversation.
"""

from __future__ import annotations

from finetune.data import chat_templates
from finetune.data.strategies import Context, Rendered, RowError, register

# Role names in the data -> the role a template understands (`roles:` adds to or overrides these).
DEFAULT_ROLE_ALIASES = {
    "system": ["system"],
    "user": ["user", "human"],
    "assistant": ["assistant", "gpt", "model"],
    "tool": ["tool", "function", "ipython"],
}


def _keys(dataset) -> tuple[str, str]:
    mappings = dataset.message_property_mappings or {}
    role = mappings.get("role") or dataset.message_field_role or "role"
    content = mappings.get("content") or dataset.message_field_content or "content"
    return role, content


def fields(dataset) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (dataset.field_messages,), ()


def _role_lookup(dataset) -> dict[str, str]:
    """Source role name -> template role; `roles:` adds aliases to the defaults."""
    lookup = {
        source: target for target, sources in DEFAULT_ROLE_ALIASES.items() for source in sources
    }
    for target, sources in (dataset.roles or {}).items():
        lookup.update(dict.fromkeys(sources, target))
    return lookup


def normalize_messages(row: dict, ctx: Context) -> tuple[list[dict], list[bool]]:
    """The row's conversation as template-ready messages, and whether each one is trained."""
    dataset = ctx.dataset
    raw = row.get(dataset.field_messages)
    if not isinstance(raw, list) or not raw:
        raise RowError(f"field {dataset.field_messages!r} should be a non-empty list of messages")
    role_key, content_key = _keys(dataset)
    roles = _role_lookup(dataset)
    messages, trained = [], []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            found = ", ".join(message) if isinstance(message, dict) else type(message).__name__
            raise RowError(
                f"message {i} needs keys {role_key!r} and {content_key!r}, found: {found} "
                "(set message_property_mappings, e.g. {role: from, content: value})"
            )
        source_role = message[role_key]
        role = roles.get(source_role)
        if role is None:
            raise RowError(
                f"message {i} has unknown role {source_role!r}; known: {', '.join(roles)} "
                "(map it with `roles:`, e.g. {assistant: [bot]})"
            )
        if role == "system" and dataset.drop_system_message:
            continue
        content = message[content_key]
        if not isinstance(content, str):
            raise RowError(f"message {i} content should be text, got {type(content).__name__}")
        flag = message.get(dataset.message_field_training)
        messages.append({"role": role, "content": content})
        trained.append(bool(flag) if flag is not None else role in dataset.roles_to_train)
    if ctx.config.default_system_message and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": ctx.config.default_system_message})
        trained.insert(0, "system" in dataset.roles_to_train)
    return messages, trained


def render(row: dict, ctx: Context) -> Rendered:
    messages, trained = normalize_messages(row, ctx)
    text = _render(messages, ctx)
    if ctx.config.train_on_inputs:
        return Rendered(text, [(0, len(text))], add_special_tokens=False)

    eot = ctx.end_of_turn
    policy = ctx.dataset.train_on_eos
    spans: list[tuple[int, int]] = []
    for i, (start, end) in enumerate(_content_spans(text, messages, ctx)):
        if trained[i] and end > start:
            spans.append((start, end))
        marker = text.find(eot, end) if eot else -1
        if marker < 0 or text[end:marker].strip():
            continue  # this template puts no end-of-turn marker after this message
        last = i == len(messages) - 1
        if (
            policy == "all"
            or (policy == "turn" and trained[i])
            or (policy == "last" and last and trained[i])
        ):
            spans.append((marker, marker + len(eot)))
    return Rendered(text, spans, add_special_tokens=False)


def _render(messages: list[dict], ctx: Context) -> str:
    try:
        return chat_templates.render(ctx.chat_template, messages, ctx.tokenizer, False)
    except Exception as exc:  # a template's raise_exception or a Jinja runtime error
        raise RowError(f"the chat template failed on this conversation: {exc}") from None


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: never in real data or templates


def _content_spans(text: str, messages: list[dict], ctx: Context) -> list[tuple[int, int]]:
    """[start, end) of each message's content in `text`.

    Renders the conversation once more with a unique sentinel in place of each content, then
    puts the contents back piece by piece: when that rebuilds `text` exactly, the offsets are
    exact, whatever the template writes around the contents (even the same words).
    """
    marked = _render([{**m, "content": _sentinel(i)} for i, m in enumerate(messages)], ctx)
    for transform in (lambda c: c, str.strip):
        rebuilt, spans, cursor = [], [], 0
        for i, message in enumerate(messages):
            at = marked.find(_sentinel(i), cursor)
            if at < 0:
                break
            rebuilt.append(marked[cursor:at])
            start = sum(map(len, rebuilt))
            content = transform(message["content"])
            rebuilt.append(content)
            spans.append((start, start + len(content)))
            cursor = at + len(_sentinel(i))
        rebuilt.append(marked[cursor:])
        if len(spans) == len(messages) and "".join(rebuilt) == text:
            return spans
    raise RowError(
        "the chat template transforms message contents, so the trained tokens cannot be "
        "located exactly; use another template"
    )


register("chat_template", fields, render)
