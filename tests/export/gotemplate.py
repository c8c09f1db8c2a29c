"""A small interpreter for the Go text/template subset Ollama Modelfiles use, written from the Go
documentation (https://pkg.go.dev/text/template), independent of finetune/export: the tests
render an exported TEMPLATE with it exactly as Ollama's Go runtime would.

Supported: text; `{{ .Field }}` on the current value and `$.Field` on the root; `{{ $var }}`,
`{{ $var := x }}`, `{{ $var = x }}` (assignment reaches the enclosing scopes, as since Go 1.11);
`range` (also `range $i, $e := x`), `if`, `else if`, `else`, `end`; the functions `eq`, `ne`,
`not`, `and`, `or`, `len`, `slice`; string and integer literals, `true`, `false`, parentheses.
Go's truth: false, 0, "", and empty collections are false. Trim markers (`{{-`, `-}}`) are
refused: the exporter promises not to emit them.
"""

from __future__ import annotations

import json
import re

ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


def render(template: str, data: dict) -> str:
    nodes, rest = _parse(_lex(template), stop=())
    assert not rest, f"unexpected {{{{ {rest[0][1]} }}}}"
    out: list[str] = []
    _run(nodes, data, [{"$": data}], out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    tokens, at = [], 0
    for match in ACTION.finditer(template):
        tokens.append(("text", template[at : match.start()]))
        inner = match.group(1)
        if inner.startswith("-") or inner.endswith("-"):
            raise ValueError("trim markers are not in the subset")
        tokens.append(("action", inner.strip()))
        at = match.end()
    tokens.append(("text", template[at:]))
    return [token for token in tokens if token != ("text", "")]


def _parse(tokens, stop):
    """Nodes until an action whose keyword is in `stop`; returns (nodes, remaining tokens)."""
    nodes = []
    while tokens:
        kind, value = tokens[0]
        keyword = value.split()[0] if kind == "action" else None
        if keyword in stop:
            return nodes, tokens
        tokens = tokens[1:]
        if kind == "text":
            nodes.append(("text", value))
        elif keyword in ("if", "range"):
            nodes_and_rest = _parse_block(keyword, value[len(keyword) :].strip(), tokens)
            nodes.append(nodes_and_rest[0])
            tokens = nodes_and_rest[1]
        else:
            nodes.append(("expr", value))
    return nodes, tokens


def _parse_block(keyword, condition, tokens):
    body, tokens = _parse(tokens, stop=("else", "end"))
    otherwise = []
    kind, value = tokens[0]
    if value.startswith("else"):
        after = value[len("else") :].strip()
        if after.startswith("if"):  # `else if X` is `else` holding `if X ... end`
            inner, tokens = _parse_block("if", after[2:].strip(), tokens[1:])
            return (keyword, condition, body, [inner]), tokens
        otherwise, tokens = _parse(tokens[1:], stop=("end",))
    return (keyword, condition, body, otherwise), tokens[1:]  # drop `end`


def _run(nodes, dot, scopes, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            value = _statement(node[1], dot, scopes)
            if value is not None:
                out.append(_text(value))
        elif node[0] == "if":
            _, condition, body, otherwise = node
            chosen = body if _truth(_eval(condition, dot, scopes)) else otherwise
            _run(chosen, dot, [*scopes, {}], out)
        elif node[0] == "range":
            _, over, body, otherwise = node
            names = re.fullmatch(r"(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", over, re.DOTALL)
            items = _eval(names.group(3) if names else over, dot, scopes) or []
            for index, item in enumerate(items):
                scope = {names.group(1): index, names.group(2): item} if names else {}
                _run(body, item, [*scopes, scope], out)
            if not items:
                _run(otherwise, dot, [*scopes, {}], out)


def _statement(text, dot, scopes):
    declare = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", text, re.DOTALL)
    if not declare:
        return _eval(text, dot, scopes)
    name, operator, expression = declare.groups()
    value = _eval(expression, dot, scopes)
    if operator == ":=":
        scopes[-1][name] = value
    else:
        next(scope for scope in reversed(scopes) if name in scope)[name] = value
    return None  # an assignment prints nothing


def _eval(text, dot, scopes):
    words = _words(text)
    return _call(words, dot, scopes)


def _call(words, dot, scopes):
    head, args = words[0], words[1:]
    functions = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "not": lambda a: not _truth(a),
        "and": lambda *v: next((x for x in v if not _truth(x)), v[-1]),
        "or": lambda *v: next((x for x in v if _truth(x)), v[-1]),
        "len": len,
        "slice": lambda items, start, *end: items[start : end[0] if end else None],
    }
    if isinstance(head, str) and head in functions:
        return functions[head](*(_value(arg, dot, scopes) for arg in args))
    assert not args, f"cannot call {head!r}"
    return _value(head, dot, scopes)


def _value(word, dot, scopes):
    if isinstance(word, list):  # a parenthesized pipeline
        return _call(word, dot, scopes)
    if word.startswith('"'):
        return json.loads(word)  # Go's double-quoted escapes are JSON's for our texts
    if word in ("true", "false"):
        return word == "true"
    if word.isdigit():
        return int(word)
    if word.startswith("$"):
        name, _, field = word.partition(".")
        value = next(scope[name] for scope in reversed(scopes) if name in scope)
        return value[field] if field else value
    if word.startswith("."):
        return dot[word[1:]] if word != "." else dot
    raise ValueError(f"unknown word {word!r}")


def _words(text):
    """Split an expression into words, parentheses as nested lists."""
    raw = re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+', text)
    stack = [[]]
    for word in raw:
        if word == "(":
            stack.append([])
        elif word == ")":
            inner = stack.pop()
            stack[-1].append(inner)
        else:
            stack[-1].append(word)
    return stack[0]


def _truth(value) -> bool:
    return bool(value)


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
