"""Imports point down the data flow: a module may import its own stage and the stages below it,
never one above (docs/ARCHITECTURE.md states the same order). Every import counts, including
those inside functions: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "psa_jax"

# Bottom to top; a stage may import from its own row and every row before it.
LAYERS = (
    ("version", "config", "core"),
    ("data",),
    ("models",),
    ("train",),
    ("sample",),
    ("eval",),
    ("export",),
    ("demo", "bench", "sweep"),
    ("cli",),
)
RANK = {stage: i for i, row in enumerate(LAYERS) for stage in row}


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every psa_jax import in ``path`` (relative ones resolved)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None or mod in ("psa_jax",) or mod.count(".") == 1:
                # `from psa_jax.data import cache`: each name may itself be a module.
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return [(line, m) for line, m in out if m == "psa_jax" or m.startswith("psa_jax.")]


def stage_of(module: str) -> str | None:
    """``psa_jax.data.cache`` -> ``data``; the package facade ``psa_jax`` -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def violations(root: pathlib.Path = ROOT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        name = _module_name(path, root)
        if name == "psa_jax":
            continue  # the public facade re-exports from below; nothing imports it back
        here = stage_of(name)
        if here not in RANK:
            found.append(f"{path}: stage {here!r} is not in LAYERS")
            continue
        for line, target in imports_of(path, root):
            there = stage_of(target)
            if there is None:
                found.append(f"{path}:{line}: imports the package facade `psa_jax`")
            elif there not in RANK:
                found.append(f"{path}:{line}: {target}: stage {there!r} is not in LAYERS")
            elif RANK[there] > RANK[here]:
                found.append(f"{path}:{line}: {here} imports {target} (a stage above it)")
    return found


def test_every_import_points_down_the_data_flow():
    assert violations() == []


def test_no_module_cycles_inside_a_stage():
    """Two modules that import each other (even lazily) are one module in two files."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        deps = {m for _, m in imports_of(path)}
        graph[_module_name(path)] = {d for d in deps if d != _module_name(path)}
    names = set(graph)
    for mod, deps in graph.items():
        for dep in deps & names:
            assert mod not in graph.get(dep, ()), f"{mod} and {dep} import each other"


def test_the_checker_catches_an_upward_import(tmp_path):
    """The rule fires: data importing train, and a stage missing from LAYERS, are reported."""
    pkg = tmp_path / "psa_jax"
    (pkg / "data").mkdir(parents=True)
    (pkg / "train").mkdir()
    (pkg / "data" / "bad.py").write_text("def f():\n    from psa_jax.train import step\n")
    (pkg / "train" / "ok.py").write_text(
        "from psa_jax.data import bad\nfrom psa_jax.core import x\n"
    )
    (pkg / "extra").mkdir()
    (pkg / "extra" / "m.py").write_text("import os\n")
    found = violations(pkg)
    assert len(found) == 2, found
    assert "data imports psa_jax.train.step" in found[0]
    assert "'extra' is not in LAYERS" in found[1]


@pytest.mark.parametrize("stage", sorted(RANK))
def test_every_stage_exists(stage):
    assert (ROOT / stage).is_dir() or (ROOT / f"{stage}.py").is_file()
