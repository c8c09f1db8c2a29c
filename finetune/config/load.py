"""Reading a config: YAML file + command-line overrides -> a validated `FinetuneConfig`.

Unknown keys are errors with a suggestion; Axolotl keys we do not implement are collected
into one warning, and Axolotl features we do not have are refused by name; every problem is
reported at once as `CONFIG: key: message`.

Relative input paths (data files, templates, models, DeepSpeed configs) are read from the
working directory, as Axolotl reads them, or else from the config file's folder when the file
is there; the loaded config holds them resolved. Output paths (`output_dir`,
`dataset_prepared_path`) are relative to the working directory.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from finetune.config.axolotl import (
    AXOLOTL_DATASET_KEYS,
    AXOLOTL_LEGACY_KEYS,
    AXOLOTL_PLUGIN_KEYS,
    AXOLOTL_QUIET_KEYS,
    AXOLOTL_TOP_LEVEL_KEYS,
    differences_worth_a_word,
    unsupported_features,
)
from finetune.config.paths import resolve_paths
from finetune.config.schema import (
    SECTIONS,
    DatasetConfig,
    FinetuneConfig,
    Problems,
    fields_by_section,
)
from finetune.errors import ConfigError

Problem = tuple[str, str]


@dataclass
class LoadedConfig:
    config: FinetuneConfig
    path: str
    warnings: list[str] = field(default_factory=list)
    # The keys given on the command line, with their values: what overrides a run's record.
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(self.path).resolve().parent


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# Why Axolotl's torch_compile keys do nothing here (bench/torch_compile.py, bench/RESULTS.md).
TORCH_COMPILE_NOT_USED = (
    "finetune trains eagerly: on a CPU compiling did not pay (the bench epoch: 63 s first step, "
    "later steps no faster, 152 s vs 88 s in all; bench/torch_compile.py); not measured on a GPU"
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The config file as a mapping; syntax errors name the line and column."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [("file", "not found; check the path")]) from None
    except IsADirectoryError:
        raise ConfigError(
            source, [("file", "is a folder; give the path of a .yaml file")]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(source, [("file", "is not UTF-8 text; save it as UTF-8")]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeySafeLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [(where, f"invalid YAML: {reason}")]) from None
    if data is None:
        raise ConfigError(source, [("file", "is empty; see examples/configs/ for a start")])
    if not isinstance(data, dict):
        raise ConfigError(source, [("file", "must be a mapping of `key: value` lines")])
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Axolotl-style overrides: `--key value`, `--key=value`, `--flag`, `--no-flag`.

    Dashes and underscores are interchangeable in keys; values are read as YAML, so numbers,
    booleans, lists and mappings work (`--lora-target-modules '[q_proj, v_proj]'`). A flag
    alone means true only for a boolean key; any other key without a value (an empty shell
    variable: `--learning-rate $LR --max-steps 10`) is an error, never a silent 1.
    """
    overrides: dict[str, Any] = {}
    problems: list[Problem] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            problems.append(
                (arg, "unexpected argument; overrides look like `--key value` or `--key=value`")
            )
            i += 1
            continue
        name, has_value, text = arg[2:].partition("=")
        key = name.replace("-", "_")
        flag = "--" + name
        if not has_value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            has_value, text = True, args[i + 1]
            i += 1
        i += 1
        if has_value:
            value = _yaml_value(text)
            if value is None or value == "":
                problems.append((flag, "has an empty value; give one (is a shell variable empty?)"))
            else:
                overrides[key] = value
        elif key.startswith("no_") and _takes_a_bare_flag(key[3:]):
            overrides[key[3:]] = False
        elif _takes_a_bare_flag(key) or key not in FinetuneConfig.model_fields:
            overrides[key] = True  # unknown keys are reported by load_config with a suggestion
        else:
            problems.append(
                (flag, "needs a value, e.g. " + f"`{flag} VALUE` (is a shell variable empty?)")
            )
    if problems:
        raise ConfigError("command line", problems)
    return overrides


def _takes_a_bare_flag(key: str) -> bool:
    """Whether `--KEY` alone can mean true: only for boolean keys (and Axolotl keys we ignore)."""
    info = FinetuneConfig.model_fields.get(key)
    if info is None:
        return key in AXOLOTL_TOP_LEVEL_KEYS
    return info.annotation is bool or bool in get_args(info.annotation)


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | Path, overrides: list[str] | None = None) -> LoadedConfig:
    """Read, override and validate a config. Raises ConfigError listing every problem."""
    source = str(path)
    raw = read_yaml(path)
    override_values = parse_overrides(overrides or [])

    problems: list[Problem] = []
    ignored: list[str] = []
    for key, value in override_values.items():
        if key in FinetuneConfig.model_fields or key in AXOLOTL_TOP_LEVEL_KEYS:
            raw[key] = value
        else:
            hint = _suggest(key, FinetuneConfig.model_fields)
            hint = f"; did you mean --{hint.replace('_', '-')}?" if hint else ""
            problems.append(("--" + key.replace("_", "-"), f"unknown option{hint}"))

    if raw.get("activation_offloading") is True:  # Axolotl's other spelling of it
        raw.pop("activation_offloading")
        raw["gradient_checkpointing"] = "offload"
    problems += unsupported_features(raw)
    known = _split_known(raw, FinetuneConfig, AXOLOTL_TOP_LEVEL_KEYS, "", problems, ignored)
    for list_key in ("datasets", "test_datasets"):
        entries = known.get(list_key)
        if isinstance(entries, list):
            known[list_key] = [
                _split_known(
                    entry,
                    DatasetConfig,
                    AXOLOTL_DATASET_KEYS,
                    f"{list_key}[{i}].",
                    problems,
                    ignored,
                )
                if isinstance(entry, dict)
                else entry
                for i, entry in enumerate(entries)
            ]

    config, field_problems = _validate(known)
    named = {key for key, _ in problems}  # a refused feature says more than its field error
    problems.extend(p for p in field_problems if p[0] not in named)
    if config is not None:
        config = resolve_paths(config, Path(source).resolve().parent, problems)
    if problems:
        raise ConfigError(source, problems)
    warnings = []
    if ignored:
        warnings.append(
            "ignored Axolotl keys (finetune does not implement them): " + ", ".join(ignored)
        )
    if raw.get("torch_compile"):  # asked for (overrides are in raw), not false
        warnings.append(f"torch_compile: {TORCH_COMPILE_NOT_USED}")
    warnings += differences_worth_a_word(config)
    return LoadedConfig(
        config=config, path=source, warnings=warnings, overrides=dict(override_values)
    )


def apply_overrides(
    config: FinetuneConfig, overrides: dict[str, Any], folder: Path, source: str
) -> FinetuneConfig:
    """`config` (a run's recorded config) with command-line overrides applied and validated."""
    if not overrides:
        return config
    config_values = {**config.model_dump(mode="json"), **overrides}
    problems: list[Problem] = []
    updated, field_problems = _validate(config_values)
    problems += field_problems
    if updated is not None:
        updated = resolve_paths(updated, folder, problems)
    if problems:
        raise ConfigError(f"{source} (command line)", problems)
    return updated


def _validate(known: dict[str, Any]) -> tuple[FinetuneConfig | None, list[Problem]]:
    """Validate; on field errors, validate again without the failed keys so that the
    cross-field checks on the remaining keys are reported in the same run."""
    try:
        return FinetuneConfig.model_validate(known), []
    except ValidationError as exc:
        problems = _validation_problems(exc)
    failed = {key.split(".")[0].split("[")[0] for key, _ in problems}
    try:
        FinetuneConfig.model_validate({k: v for k, v in known.items() if k not in failed})
    except ValidationError as exc:
        seen = {key for key, _ in problems}
        # A key left out for this second pass is not missing: its own problem is reported.
        problems += [p for p in _validation_problems(exc) if p[0] not in seen | failed]
    return None, problems


def _split_known(
    raw: dict[str, Any],
    model: type[BaseModel],
    axolotl_keys: frozenset[str],
    prefix: str,
    problems: list[Problem],
    ignored: list[str],
) -> dict[str, Any]:
    """Keep the keys `model` defines; sort the rest into unknown (a problem) or Axolotl-only."""
    known = {}
    if not prefix:
        axolotl_keys = axolotl_keys | AXOLOTL_PLUGIN_KEYS | AXOLOTL_LEGACY_KEYS
    for key, value in raw.items():
        if key in model.model_fields:
            # Axolotl configs leave a key empty (`fp16:`) to mean "the default".
            if value is not None:
                known[key] = value
        elif key in axolotl_keys or key in AXOLOTL_QUIET_KEYS:
            # A key left empty or off asks for nothing, so there is nothing to warn about.
            if key not in AXOLOTL_QUIET_KEYS and value not in (None, False, "", [], {}):
                ignored.append(prefix + str(key))
        else:
            hint = _suggest(str(key), [*model.model_fields, *axolotl_keys])
            hint = f"; did you mean {hint!r}?" if hint else ""
            problems.append((prefix + str(key), f"unknown key{hint}"))
    return known


def _suggest(key: str, choices: Any) -> str | None:
    matches = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


# Names pydantic adds to an error's location for the member of a union that failed.
_UNION_TAGS = ("bool", "int", "float", "str", "dict", "list", "literal", "DatasetFormat")


def _validation_problems(exc: ValidationError) -> list[Problem]:
    by_key: dict[str, list[str]] = {}
    for error in exc.errors():
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, Problems):
            for key, message in cause.problems:
                by_key.setdefault(key, []).append(message)
            continue
        key = _location(error["loc"])
        by_key.setdefault(key, []).append(_message(error))
    problems = []
    for key, messages in by_key.items():
        unique = list(dict.fromkeys(messages))
        if len(unique) > 1 and all(m.startswith("should be") for m in unique):
            # One union field failed every member: say what it accepts, once.
            got = unique[0].split(" (got ", 1)[-1] if " (got " in unique[0] else ""
            kinds = " or ".join(m.removeprefix("should be ").split(" (got ")[0] for m in unique)
            unique = [f"should be {kinds}" + (f" (got {got}" if got else "")]
        problems.append((key, "; ".join(unique)))
    return problems


def _location(loc: tuple) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part.split("[")[0] in _UNION_TAGS or "[" in part or "-" in part:
            continue
        else:
            parts.append(("." if parts else "") + part)
    return "".join(parts) or "config"


def _message(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "missing":
        return "required; add it"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    text = msg.replace("Input should be", "should be")
    if text and text[0].isupper():
        text = text[0].lower() + text[1:]
    value = error.get("input")
    if not isinstance(value, dict | list) and value is not None:
        text += f" (got {value!r})"
    return text


def render_config(config: FinetuneConfig) -> str:
    """The resolved config as YAML, grouped by section, every key present."""
    values = config.model_dump(mode="json")
    blocks = []
    for section in SECTIONS:
        names = fields_by_section()[section]
        body = yaml.safe_dump(
            {name: values[name] for name in names}, sort_keys=False, allow_unicode=True, width=100
        )
        blocks.append(f"# --- {section} ---\n{body}")
    return "\n".join(blocks)
