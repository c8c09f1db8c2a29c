"""The package's layout holds: each stage imports only the stages below it, every package says
what it owns, and long modules say why they are long."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "finetune"

# What each part may import from finetune (besides itself and the package root's version).
# Dependencies point one way: cli -> train/merge/inference -> data/model -> machine -> config.
BASE = {"finetune.errors", "finetune.fs", "finetune.dtypes", "finetune.hub"}
ALLOWED = {
    "finetune": {"finetune.hub"},  # the package root: its version, the Hub-kernel guard
    "finetune.errors": set(),
    "finetune.fs": set(),
    "finetune.dtypes": {"finetune.errors"},
    "finetune.hub": set(),
    "finetune.config": {"finetune.errors", "finetune.hub"},
    "finetune.machine": {"finetune.config", *BASE},
    "finetune.data": {"finetune.config", *BASE},
    "finetune.model": {"finetune.config", "finetune.machine", *BASE},
    "finetune.train": {
        "finetune.config",
        "finetune.data",
        "finetune.model",
        "finetune.machine",
        "finetune.runfolder",
        *BASE,
    },
    "finetune.merge": BASE,
    "finetune.export": {
        "finetune.config",
        "finetune.data",
        "finetune.merge",
        "finetune.model",
        "finetune.machine",
        "finetune.runfolder",
        *BASE,
    },
    "finetune.evaluate": {
        "finetune.config",
        "finetune.data",
        "finetune.model",
        "finetune.machine",
        "finetune.inference",
        "finetune.train",  # train.loss: the loss training reports
        "finetune.merge",  # merge.verify: its tolerances
        "finetune.runfolder",
        *BASE,
    },
    "finetune.plan": {
        "finetune.config",
        "finetune.data",
        "finetune.model",
        "finetune.machine",
        "finetune.train",
        *BASE,
    },
    "finetune.push": {"finetune.config", *BASE},
    "finetune.runfolder": {"finetune.config", "finetune.model", "finetune.machine", *BASE},
    "finetune.preflight": {
        "finetune.config",
        "finetune.data",
        "finetune.model",
        "finetune.machine",
        *BASE,
    },
    "finetune.inference": {
        "finetune.config",
        "finetune.data",
        "finetune.model",
        "finetune.machine",
        *BASE,
    },
    "finetune.cli": None,  # the top: anything
    "finetune.__main__": None,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every finetune module `path` imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("finetune.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    module = _module_name(path)
    allowed = ALLOWED[_part(module)]
    if allowed is None:
        return
    own = _part(module)
    wrong = sorted(
        name
        for name in _imports(path)
        if _part(name) != own and _part(name) not in allowed and name != "finetune.__version__"
    )
    assert not wrong, f"{module} imports {wrong}; {own} may import only {sorted(allowed)}"


def test_every_part_is_listed():
    parts = {_part(_module_name(path)) for path in MODULES}
    assert parts == set(ALLOWED), "add the new part to ALLOWED with what it may import"


@pytest.mark.parametrize(
    "package", sorted(p.parent for p in PACKAGE.rglob("__init__.py")), ids=lambda p: p.name
)
def test_every_package_says_what_it_owns(package: Path):
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert docstring and len(docstring.split()) >= 8, f"{package}/__init__.py needs a docstring"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_long_modules_say_why(path: Path):
    lines = len(path.read_text().splitlines())
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= 400 or "Longer than" in docstring, (
        f"{path.relative_to(PACKAGE)} has {lines} lines: split it, or say at its top why not "
        "('Longer than ... because ...')"
    )
