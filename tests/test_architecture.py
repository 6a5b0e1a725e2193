"""The layering of docs/architecture.md, checked on the source: no import points up a layer or sideways into a
peer, none reaches another package's private names, and no module outgrows ~400 lines. Imports inside functions
count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kdcli"

# Lower numbers are lower layers. A package may import only from strictly lower layers (its own modules aside).
LAYERS = {
    "errors": 0,
    "sizes": 0,
    "host": 0,
    "durable": 1,
    "hardware": 1,
    "hub": 1,
    "losses": 2,
    "recipe": 3,
    "data": 4,
    "models": 5,
    "runs": 5,
    "cache": 6,
    "evaluation": 6,
    "loggers": 6,
    "engine": 7,
    "compare": 7,
    "plan": 8,
    "grid": 8,
    "ui": 9,
    "cli": 10,
    "__main__": 11,
}
MAX_LINES = 420


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every absolute kdcli import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kdcli."):
            out.append((node.lineno, node.module or "", [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names if a.name.startswith("kdcli."))
    return out


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if _unit(p) != "__init__")


def test_every_package_has_a_layer() -> None:
    units = {_unit(p) for p in SOURCES}
    assert units <= set(LAYERS), f"add {sorted(units - set(LAYERS))} to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_and_stay_public(path: Path) -> None:
    here = _unit(path)
    problems = []
    for line, module, names in _imports(path):
        parts = module.split(".")
        there = parts[1]
        if there == here:
            continue
        if LAYERS[there] >= LAYERS[here]:
            problems.append(f"line {line}: {here} (layer {LAYERS[here]}) imports {module} (layer {LAYERS[there]})")
        private = [p for p in parts[2:] if p.startswith("_")] + [n for n in names if n.startswith("_")]
        if private:
            problems.append(f"line {line}: imports private {module}: {', '.join(private)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_outgrows_the_limit(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{lines} lines: split it by responsibility"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: an upward and a private import are both found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kdcli.engine.trainer import _x\n", encoding="utf-8")
    (line, module, names), *_ = _imports(bad)
    assert (line, module, names) == (2, "kdcli.engine.trainer", ["_x"])
    assert LAYERS["engine"] >= LAYERS["cache"]
