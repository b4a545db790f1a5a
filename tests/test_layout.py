"""The layout shows the pipeline: subpackages in pipeline order, imports that only point down, no circle, no
private name crossing a module (tests and benchmarks included), at most ten top-level modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a module may import from its own layer or a lower one, never a higher one.
LAYERS = (
    ("growir.errors", "growir.quiet", "growir.report"),
    ("growir.ir",),
    ("growir.frontend",),
    ("growir.analysis",),
    ("growir.passes",),
    ("growir.verify",),
    ("growir.materialize",),
    ("growir.pipeline",),
    ("growir.stream",),
    ("growir.api", "growir.optim", "growir.doctor", "growir.cli", "growir.train"),
    ("growir", "growir.__main__"),
)


def modules() -> dict:
    """module name -> file, for growir and benchmarks."""
    out = {}
    for path in sorted((ROOT / "growir").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, str]]:
    """(module imported, name imported or '') for every import of a file, function-level ones too; a relative
    import resolved, an import of a benchmark script by its bare name as ``benchmarks.x``."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
                if f"benchmarks.{target}" in known:
                    target = f"benchmarks.{target}"
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, "") if sub in known else (target, alias.name))
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
    return [(m, n) for m, n in out if m.split(".")[0] in ("growir", "benchmarks")]


def layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_layout.py"
    return best[0]


def owner(module: str, known: dict) -> str:
    """The module a name comes from: a package's re-export counts as its own."""
    while module not in known and "." in module:
        module = module.rpartition(".")[0]
    return module


def test_at_most_ten_top_level_modules():
    top = sorted(p.name for p in (ROOT / "growir").glob("*.py"))
    assert len(top) <= 10, top


def test_growir_imports_only_point_down():
    known = modules()
    up = [f"{m} -> {t}" for m, path in known.items() if m.startswith("growir")
          for t, _ in imports(m, path, known) if layer(owner(t, known)) > layer(m)]
    assert not up


def test_no_import_circle():
    known = modules()
    graph = {m: {owner(t, known) for t, _ in imports(m, p, known)} - {m} for m, p in known.items()}
    graph = {m: {t for t in ts if t in known and not (m.startswith(t + ".") and known[t].name == "__init__.py")}
             for m, ts in graph.items()}  # a module importing its own package's face is not a circle
    done, path, circles = set(), [], []

    def visit(m):
        if m in path:
            circles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        path.append(m)
        for t in sorted(graph.get(m, ())):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert not circles


@pytest.mark.parametrize("where", ["growir", "benchmarks", "tests", "examples"])
def test_no_private_name_crosses_a_module(where):
    known = modules()
    found = []
    for path in sorted((ROOT / where).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for target, imported in imports(name, path, known):
            if imported.startswith("_") and not imported.startswith("__"):
                found.append(f"{path.relative_to(ROOT)}: {imported} from {target}")
    assert not found
