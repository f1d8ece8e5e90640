"""Layers point one way: the core library and the judges never import the data recipes or the orchestrations.

- ``metacot`` (all but ``metacot.experiments``) is the core: models, trainers, evaluation, export, run folders.
- ``rewards`` (judges, calibration) builds on the core.
- ``data_recipes`` (dataset builders) builds on both.
- ``metacot.experiments`` (the quickstart, the ablation) orchestrates all of them; nothing imports it.

Counted over every ``import`` statement, including those inside functions. To list the imports by hand:
``python tests/test_layers.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package -> the packages it must never import (a prefix matches the package and its modules)
FORBIDDEN = {
    "metacot": ("data_recipes", "metacot.experiments"),
    "rewards": ("data_recipes", "metacot.experiments"),
    "data_recipes": ("metacot.experiments",),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def layer_of(path: Path) -> str | None:
    rel = path.relative_to(REPO).as_posix()
    if rel.startswith("metacot/experiments/"):
        return None  # the orchestration layer may import anything
    return rel.split("/", 1)[0] if rel.split("/", 1)[0] in FORBIDDEN else None


def wrong_way_imports() -> list[str]:
    found = []
    for path in sorted(REPO.glob("*/**/*.py")):
        layer = layer_of(path)
        if layer is None:
            continue
        for line, module in imports(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                found.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {module}")
    return found


def test_no_import_points_the_wrong_way() -> None:
    assert wrong_way_imports() == []


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from data_recipes.synth import generate\n    import metacot.experiments.quickstart\n")
    assert imports(probe) == [(2, "data_recipes.synth"), (3, "metacot.experiments.quickstart")]


if __name__ == "__main__":
    print("\n".join(wrong_way_imports()) or "no wrong-way imports")
