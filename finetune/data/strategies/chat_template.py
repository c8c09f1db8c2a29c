"""`chat_template`: conversations rendered with a chat template; only trained turns keep labels.

Which characters are trained is found in the *rendered text*, and tokens are labelled from
their character offsets. Tokenizers merge text across turn boundaries, so tokenizing turns
separately would give different tokens from the ones inference sees; this way the tokens are
exactly those of the whole conversation.

A trained assistant turn is everything the model writes after the generation prompt of the
conversation so far (its reasoning block too, for templates that write one), up to its
content's end, then the end-of-turn marker right after it (per `train_on_eos`). Where each
message's content lies is found exactly even when a template rewrites contents depending on
the conversation (Qwen3 drops the reasoning of earlier turns; Mistral moves the system
message): by replacing one message at a time and seeing which characters change.
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
        normalized = {"role": role, "content": content}
        reasoning = message.get(dataset.field_thinking)
        if role == "assistant" and dataset.split_thinking and reasoning is None:
            reasoning, normalized["content"] = split_reasoning(content)
        if role == "assistant" and isinstance(reasoning, str):
            normalized[dataset.template_thinking_key] = reasoning
        messages.append(normalized)
        trained.append(bool(flag) if flag is not None else role in dataset.roles_to_train)
    if ctx.config.default_system_message and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": ctx.config.default_system_message})
        trained.insert(0, "system" in dataset.roles_to_train)
    return messages, trained


# Tag pairs `split_thinking` takes out of assistant contents (Axolotl's).
THINKING_TAGS = (
    ("<think>", "</think>"),
    ("<reasoning>", "</reasoning>"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
)


def split_reasoning(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant content that opens with a thinking block."""
    stripped = content.lstrip()
    for opening, closing in THINKING_TAGS:
        if stripped.startswith(opening) and closing in stripped:
            reasoning, _, answer = stripped[len(opening) :].partition(closing)
            return reasoning.strip("\n"), answer.lstrip("\n")
    return None, content


def render(row: dict, ctx: Context) -> Rendered:
    messages, trained = normalize_messages(row, ctx)
    text = _render(messages, ctx)
    if ctx.config.train_on_inputs:
        return Rendered(text, [(0, len(text))], add_special_tokens=False)

    policy = ctx.dataset.train_on_eos
    spans: list[tuple[int, int]] = []
    answers = stopped = 0
    for i, (start, end) in enumerate(_content_spans(text, messages, ctx)):
        answer = trained[i] and messages[i]["role"] == "assistant"
        if answer:
            answers += 1
            start = _answer_start(text, messages[:i], start, ctx)
        if trained[i] and end > start:
            spans.append((start, end))
        marker = _marker_after(text, end, ctx.end_of_turn)
        if marker is None:
            continue  # this template writes no end-of-turn marker after this message
        last = i == len(messages) - 1
        if (
            policy == "all"
            or (policy == "turn" and trained[i])
            or (policy == "last" and last and trained[i])
        ):
            spans.append(marker)
            stopped += answer
    return Rendered(text, spans, add_special_tokens=False, answers=answers, stopped=stopped)


def _render(messages: list[dict], ctx: Context, generation_prompt: bool = False) -> str:
    try:
        return chat_templates.render(ctx.chat_template, messages, ctx.tokenizer, generation_prompt)
    except Exception as exc:  # a template's raise_exception or a Jinja runtime error
        raise RowError(f"the chat template failed on this conversation: {exc}") from None


def _answer_start(text: str, before: list[dict], content_start: int, ctx: Context) -> int:
    """Where the model starts writing this answer: right after the generation prompt of the
    conversation so far, when the full text begins with that prompt (else its content)."""
    try:
        prompt = _render(before, ctx, generation_prompt=True)
    except RowError:
        return content_start
    if text.startswith(prompt) and len(prompt) <= content_start:
        return len(prompt)
    return content_start


def _marker_after(text: str, end: int, markers: tuple[str, ...]) -> tuple[int, int] | None:
    """The first end-of-turn marker after `end`, with nothing but whitespace before it."""
    found = None
    for marker in markers:
        at = text.find(marker, end) if marker else -1
        if at >= 0 and not text[end:at].strip() and (found is None or at < found[0]):
            found = (at, at + len(marker))
    return found


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: never in real data or templates


def _content_spans(text: str, messages: list[dict], ctx: Context) -> list[tuple[int, int]]:
    """[start, end) of each message's content as rendered in `text`."""
    return _spans_by_sentinels(text, messages, ctx) or _spans_by_difference(text, messages, ctx)


def _spans_by_sentinels(text: str, messages: list[dict], ctx: Context):
    """One more rendering with a unique sentinel in place of each content; the contents put
    back piece by piece must rebuild `text` exactly (then the offsets are exact, whatever the
    template writes around the contents). None when the template transforms contents."""
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
    return None


def _spans_by_difference(text: str, messages: list[dict], ctx: Context):
    """For templates whose output depends on the contents: message by message, the characters
    of `text` that change when only that message's content (and reasoning) is replaced."""
    spans = []
    for i, message in enumerate(messages):
        blank = {"role": message["role"], "content": _sentinel(i)}
        other = _render([*messages[:i], blank, *messages[i + 1 :]], ctx)
        prefix = _common_prefix(text, other)
        if prefix == len(text) == len(other):  # not rendered at all (e.g. a moved system turn)
            spans.append((prefix, prefix))
            continue
        limit = min(len(text), len(other)) - prefix
        suffix = _common_prefix(text[::-1], other[::-1], limit)
        spans.append((prefix, len(text) - suffix))
    return spans


def _common_prefix(a: str, b: str, limit: int | None = None) -> int:
    """Length of the common prefix (at most `limit`), by binary search over C-speed slice
    comparisons."""
    low, high = 0, min(len(a), len(b)) if limit is None else limit
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


register("chat_template", fields, render)
