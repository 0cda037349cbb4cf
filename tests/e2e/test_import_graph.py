"""The import graph of r4b: no cycle anywhere, and r4b.kernels imports torch, triton and the standard library only.

Every module under ``r4b/`` is parsed with :mod:`ast` (nothing is imported). Every import statement counts, a lazy
one inside a function included (a lazy import that dodges a cycle is still a cycle), and so does
``importlib.import_module("...")`` with a constant name (a computed name, as in r4b.eval's lazy ``__getattr__``, is
not seen). Relative imports are resolved against the importing
module's package. ``from pkg import name`` is an edge to the module ``pkg.name`` when there is one, and to ``pkg``
for every name that is not a module; an edge to a package is an edge to its ``__init__.py``.
"""

from __future__ import annotations

import ast
import itertools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "r4b"
KERNELS_ALLOWED = {"torch", "triton"} | set(sys.stdlib_module_names)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted name: file}`` of every module under ``root`` (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str] | dict[str, Path]) -> list[tuple[str, int]]:
    """``(absolute module name, line)`` of every import in module ``name`` (file ``path``), in file order; with
    ``from pkg import a, b`` the modules among ``pkg.a``, ``pkg.b`` that are in ``known``, and ``pkg`` when a name is
    not one of them."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                source = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known]
            out += [(sub, node.lineno) for sub in subs]
            if len(subs) < len(node.names):
                out.append((source, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.args[0].value, node.lineno))
    return sorted(out, key=lambda item: item[1])


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """``{module: {imported module under root: line of the first such import}}``."""
    known = modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges = graph[name] = {}
        for target, line in imports(name, path, known):
            if target in known and target != name:
                edges.setdefault(target, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]], root: Path = ROOT) -> str:
    files = modules(root)
    steps = [
        f"{a} ({files[a].relative_to(root.parent)}:{graph[a][b]}) imports {b}" for a, b in itertools.pairwise(cycle)
    ]
    return "import cycle: " + " -> ".join(cycle) + "\n  " + "\n  ".join(steps)


def test_r4b_has_no_import_cycle():
    graph = import_graph()
    assert "r4b.rl.reward" in graph and "r4b.kernels" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, describe(cycle, graph)


def optional_import_lines(path: Path) -> set[int]:
    """Lines of the imports inside a ``try`` whose handler catches ImportError (an optional accelerator such as
    flash-attn, used when installed)."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {kind.id for kind in kinds if isinstance(kind, ast.Name)}
        if caught & {"ImportError", "ModuleNotFoundError"}:
            found = (n for stmt in node.body for n in ast.walk(stmt))
            lines |= {n.lineno for n in found if isinstance(n, ast.Import | ast.ImportFrom)}
    return lines


def kernel_import_problems(root: Path = ROOT) -> list[str]:
    """``file:line imports name`` for every import of ``<root>/kernels`` that is neither a kernels module, torch,
    triton nor the standard library; an optional one (tried under ``except ImportError``) passes when it is no part of
    the package."""
    known = modules(root)
    package = f"{root.name}.kernels"
    kernels = {name: path for name, path in known.items() if name == package or name.startswith(package + ".")}
    assert kernels, f"no {package} under {root}"
    bad = []
    for name, path in kernels.items():
        optional = optional_import_lines(path)
        for target, line in imports(name, path, known):
            top = target.partition(".")[0]
            if target in kernels or top in KERNELS_ALLOWED or (line in optional and top != root.name):
                continue
            bad.append(f"{path.relative_to(root.parent)}:{line} imports {target}")
    return bad


def test_kernels_import_only_torch_triton_and_the_standard_library():
    """r4b.kernels never imports the rest of r4b, nor any third-party module but torch and triton (flash-attn, tried
    under ``except ImportError``, is optional)."""
    bad = kernel_import_problems()
    assert not bad, "r4b.kernels must import only torch, triton and the standard library:\n" + "\n".join(bad)


def test_kernels_check_flags_r4b_and_third_party_imports(tmp_path):
    """The kernels check itself: an import of the rest of r4b, or of another library outside ``try/except
    ImportError``, is named; the same library inside one is not, nor are the kernels' own modules."""
    root = write(
        tmp_path / "r4b",
        {
            "__init__.py": "",
            "format.py": "",
            "kernels/__init__.py": "from .losses import f\nfrom . import losses\n",
            "kernels/losses.py": (
                "import torch\nimport numpy\ntry:\n    import flash_attn\nexcept ImportError:\n    pass\n"
                "def f():\n    from r4b.format import THINK_OPEN\n    from r4b.kernels import losses\n"
            ),
        },
    )
    assert kernel_import_problems(root) == [
        "r4b/kernels/losses.py:2 imports numpy",
        "r4b/kernels/losses.py:8 imports r4b.format",
    ]


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        # a lazy import inside a function that dodges a module-level cycle is still a cycle
        (
            {"__init__.py": "", "a.py": "from pkg.b import g\n", "b.py": "def g():\n    from pkg.a import f\n"},
            ["pkg.a", "pkg.b"],
        ),
        # relative imports, across packages
        (
            {
                "__init__.py": "",
                "x/__init__.py": "",
                "x/m.py": "from ..y import n\n",
                "y/__init__.py": "",
                "y/n.py": "def f():\n    from ..x.m import q\n",
            },
            ["pkg.x.m", "pkg.y.n"],
        ),
        # a package __init__ re-exporting from a submodule that imports the package
        (
            {"__init__.py": "", "p/__init__.py": "from .s import thing\n", "p/s.py": "from pkg.p import other\n"},
            ["pkg.p", "pkg.p.s"],
        ),
        # `from . import sub` is an edge to the submodule
        (
            {"__init__.py": "", "p/__init__.py": "", "p/s.py": "from . import t\n", "p/t.py": "import pkg.p.s\n"},
            ["pkg.p.s", "pkg.p.t"],
        ),
        # importlib.import_module with a constant name; and a TYPE_CHECKING import counts too
        (
            {
                "__init__.py": "",
                "a.py": "import importlib\nimportlib.import_module('pkg.b')\n",
                "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n",
            },
            ["pkg.a", "pkg.b"],
        ),
        # no cycle: an __init__ re-exporting submodules that import each other one way; other packages ignored
        (
            {
                "__init__.py": "",
                "p/__init__.py": "from .s import thing\nfrom . import t\n",
                "p/s.py": "import os\nfrom pkg.p.t import f\n",
                "p/t.py": "import torch\nfrom pkg import q\n",
                "q.py": "",
            },
            None,
        ),
    ],
)
def test_find_cycle_on_small_packages(tmp_path, files, expected):
    root = write(tmp_path / "pkg", files)
    graph = import_graph(root)
    cycle = find_cycle(graph)
    if expected is None:
        assert cycle is None, describe(cycle, graph, root)
    else:
        assert cycle is not None and cycle[0] == cycle[-1] and sorted(cycle[:-1]) == expected, cycle
        assert describe(cycle, graph, root).startswith("import cycle: ")
