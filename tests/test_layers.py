"""Imports point down: every lowbit module imports only modules of its own layer or lower ones.

Every import statement counts (module level, inside functions, relative and absolute). algorithms and
formats are siblings that never import each other, and no modules import each other in a cycle. The same
table is import-linter's contract in pyproject.toml ([tool.importlinter]): `lint-imports` checks it too.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = "lowbit"

# Lowest first. A module's layer is named by its first part under lowbit ("" = lowbit/__init__.py).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "core"),  # exceptions; schemes, quant/dequant, packing, GPTQ's math, text, paths, memory
    ("kernels",),  # compute paths for quantized modules
    ("nn",),  # quantized modules
    ("models",),  # architecture table, HF/GGUF/lazy loading, zoo
    ("calibration",),  # calibration data, layer-sequential pipeline
    ("algorithms", "formats"),  # siblings: neither imports the other
    ("runtime",),  # lean decoder, its model skeleton, generation
    ("eval",),  # perplexity, size, speed, outliers, llama.cpp, inspect
    ("workflows",),  # load, run a method, evaluate, save (QAT end to end)
    ("api",),
    ("cli",),
    ("__main__", ""),
]
SIBLINGS = {frozenset(("algorithms", "formats"))}  # layers whose parts may not import each other
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for p in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imports_of(name: str, source: str, is_pkg: bool, known: set[str]) -> list[tuple[str, int]]:
    """(imported lowbit module, line) for every import statement anywhere in module `name`'s source."""
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                while t not in known and "." in t:  # `import lowbit.x.y` of an attribute: its module
                    t = t.rsplit(".", 1)[0]
                out.append((t, node.lineno))
    return out


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, dict[str, int]]:
    mods = modules()
    known = set(mods)
    g: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        g[name] = {}
        for t, line in imports_of(name, path.read_text(), path.name == "__init__.py", known):
            if t != name:
                g[name].setdefault(t, line)
    return g


def test_every_module_has_a_layer():
    missing = sorted({layer(m) for m in modules()} - set(LEVEL))
    assert not missing, f"add these to LAYERS (and pyproject.toml's contract): {missing}"


def test_imports_point_down():
    bad = []
    for name, targets in graph().items():
        for t, line in targets.items():
            a, b = layer(name), layer(t)
            if a not in LEVEL or b not in LEVEL:
                continue  # test_every_module_has_a_layer reports it
            if LEVEL[b] > LEVEL[a]:
                bad.append(f"{name}:{line} imports {t} (layer {b!r} is above {a!r})")
            elif a != b and frozenset((a, b)) in SIBLINGS:
                bad.append(f"{name}:{line} imports {t} ({a!r} and {b!r} are siblings)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "modules that import each other in a cycle: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_scan_sees_every_kind_of_import():
    source = """
import lowbit.core.quant
from ..core import rotation
from . import _log_once
from .int4 import MAX_ROWS


def f():
    from ..eval.size import weight_stats
    import torch
"""
    got = {t for t, _ in imports_of("lowbit.kernels.int8", source, False, set(modules()))}
    assert got == {"lowbit.core.quant", "lowbit.core.rotation", "lowbit.kernels", "lowbit.kernels.int4",
                   "lowbit.eval.size"}
    got = {t for t, _ in imports_of("lowbit.kernels", "from .int4 import pack_int4", True, set(modules()))}
    assert got == {"lowbit.kernels.int4"}


def contract_layers() -> list[tuple[str, ...]]:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in conf["contracts"] if c["type"] == "layers"]
    assert contract["containers"] == [PACKAGE]
    out = []
    for entry in reversed(contract["layers"]):
        sep = "|" if "|" in entry else ":"
        out.append(tuple(sorted(s.strip() for s in entry.split(sep))))
    return out


def test_import_linter_contract_is_this_table():
    mine = [tuple(sorted(n for n in layer if n)) for layer in LAYERS]
    assert contract_layers() == mine
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in conf["contracts"] if c["type"] == "layers"]
    independent = {frozenset(s.strip() for s in e.split("|")) for e in contract["layers"] if "|" in e}
    assert independent == SIBLINGS


def test_lint_imports():
    """import-linter's own analysis of this tree (src/ first on its path, not an installed lowbit)."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]'): lint-imports not run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout, r.stdout
    assert f"Analyzed {len(modules())} files" in r.stdout, r.stdout  # this tree's modules, all of them
