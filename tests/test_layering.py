"""Lower layers never import higher ones: base <- library <- lab <- interfaces."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bnlab"
LAYERS = {
    "base": ["_paths", "_json", "errors"],  # stdlib-only modules that every layer may use
    "library": ["functional", "nn", "reference", "tools", "doctor"],
    "lab": ["data", "models", "train", "store", "stats", "experiments", "probes"],
    "interface": ["report", "cli", "web"],  # what a person reads or runs: tables, HTML, the command, the app
}
RANK = {name: rank for rank, layer in enumerate(LAYERS.values()) for name in layer}


def _component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "bnlab" else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "bnlab":  # `from bnlab import functional as BF` imports bnlab.functional
                yield from (f"bnlab.{a.name}" for a in node.names)
            else:
                yield node.module


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_upward_imports(path):
    rel = path.relative_to(SRC)
    own = rel.parts[0].removesuffix(".py")
    if own not in RANK:
        return  # bnlab/__init__.py
    for module in _imports(path):
        target = _component(module)
        if target in RANK:
            assert RANK[target] <= RANK[own], f"{rel} ({own}) imports {module} from a higher layer"
