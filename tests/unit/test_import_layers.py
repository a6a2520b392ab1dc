"""Dependencies run one way (DESIGN.md): the import statements of every module, read with ``ast``.

    experiments/  ->  eval/, data_prep/  ->  medloc/

- ``medloc`` (the library) imports none of ``data_prep``, ``eval``, ``experiments``;
- ``eval`` (evaluation commands, tables, plots) and ``data_prep`` (datasets on disk) are siblings
  above the library: neither imports the other, nor ``experiments``;
- ``experiments`` (sweeps, benches, probes) may import all of them.

Every import counts, also one inside a function (a lazy import is still a dependency) or a
type-only one. Then no circle: neither between the packages nor between modules (there, only the
imports that run count). (The one wire from a
command to data_prep, the Hydra callback that builds missing phantom data, is configuration:
``conf/config.yaml`` names ``data_prep.build.BuildMissingData``; the last test checks it exists.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("medloc", "eval", "data_prep", "experiments")
FORBIDDEN = {
    "medloc": {"data_prep", "eval", "experiments"},
    "eval": {"data_prep", "experiments"},
    "data_prep": {"eval", "experiments"},
    "experiments": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, *, type_only: bool):
    for child in ast.iter_child_nodes(node):
        if not type_only and _type_checking_block(child):
            yield from (n for x in child.orelse for n in [x, *_walk(x, type_only=False)])
            continue
        yield child
        yield from _walk(child, type_only=type_only)


def imports_of(path: Path, *, type_only: bool = True) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved).

    ``type_only=False`` leaves out the imports under ``if TYPE_CHECKING:`` (never executed).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out: set[str] = set()
    for node in _walk(tree, type_only=type_only):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join([*base, *([node.module] if node.module else [])])
            else:
                stem = node.module or ""
            out.add(stem)
            # `from medloc.data import collate` imports the module medloc.data.collate
            out.update(f"{stem}.{alias.name}" for alias in node.names if alias.name != "*")
    return out


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def graph(*, type_only: bool = True) -> dict[str, set[str]]:
    """module -> the project modules it imports (``type_only``: see ``imports_of``)."""
    modules = project_modules()
    return {m: {i for i in imports_of(p, type_only=type_only) if i in modules and i != m}
            for m, p in modules.items()}


def test_the_walk_sees_known_imports():
    g = graph()
    assert {"medloc", "eval", "data_prep", "experiments"} <= {m.split(".")[0] for m in g}
    assert "medloc.grpo.rollout" in g["medloc.grpo.trainer"]
    assert "medloc.data.collate" in g["medloc.sft"]  # from medloc.data.collate import ...
    assert "medloc.evaluation" in g["eval.evaluate"]  # an import inside a function
    assert "data_prep.build" in g["experiments.sweep"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_points_back_up(package):
    bad = sorted(
        f"{m} imports {i}"
        for m, targets in graph().items() if m.split(".")[0] == package
        for i in targets if i.split(".")[0] in FORBIDDEN[package]
    )
    assert not bad, "dependencies must run one way (DESIGN.md):\n" + "\n".join(bad)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``edges`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_circle_between_packages():
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for m, targets in graph().items():
        edges[m.split(".")[0]] |= {i.split(".")[0] for i in targets} - {m.split(".")[0]}
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_no_circle_between_modules():
    # Imports that run: a type-only import (``if TYPE_CHECKING:``) makes no circle. A package's
    # __init__ is left out: importing medloc.x.y runs medloc/x/__init__.py, which is not a
    # dependency of medloc.x.y's code.
    edges = {m: {i for i in t if not _is_package(i)}
             for m, t in graph(type_only=False).items() if not _is_package(m)}
    circle = _cycle(edges)
    assert circle is None, "import circle: " + " -> ".join(circle)


def _is_package(module: str) -> bool:
    return (REPO / Path(*module.split(".")) / "__init__.py").is_file()


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_configured_data_builder_exists():
    from omegaconf import OmegaConf

    target = OmegaConf.load(REPO / "conf" / "config.yaml").hydra.callbacks.build_missing_data._target_
    module, _, name = target.rpartition(".")
    assert module == "data_prep.build" and name in {
        n.name for n in ast.parse((REPO / "data_prep" / "build.py").read_text()).body
        if isinstance(n, ast.ClassDef)}
