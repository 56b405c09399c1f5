"""The package's structure: where TVM may be imported, and no import cycles.

(a) capture -> rewrite -> partition (`hwaware.decompose`) runs without importing TVM, on a model
of each fused kernel family (conv block, ConvNeXt block, residual block, GNN layer, RGCN layer,
attention); (b) only `hwaware/tvm/` and the kernel families' lowering modules import TVM (at
all: a family's pattern module not even inside a function), and every family names an existing
lowering module; the static table of supported ATen ops equals the installed TVM's; (c) the
package's module-level imports form no cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from hwaware.aten_ops import SUPPORTED_ATEN_OPS
from tests.helpers import tvm_supported_aten_ops

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hwaware"
TVM_MODULES = ("tvm", "tvm_ffi")
# the kernel families' lowering halves: they import TVM at module level (imported only to lower
# or schedule); their pattern halves (hwaware/kernels/<family>.py) must not
LOWERING_MODULES = {f"hwaware/kernels/{m}.py" for m in (
    "attention_kernel", "conv_kernel", "convnext_kernel", "gnn_kernel", "lowering_common",
    "resblock_kernel", "rgcn_kernel")}

# one zoo model per fused kernel family
FAMILY_OF_MODEL = {"mobilenetv2_block": "conv_block", "convnext_block": "convnext_block",
                   "resnet_basic_block": "res_block", "gcn_layer": "gnn", "rgcn_layer": "rgcn",
                   "attention_core": "attention"}
DECOMPOSE_WITHOUT_TVM = textwrap.dedent('''
    import json, sys
    import hwaware
    from hwaware.zoo import get_model

    families = {}
    for name in sys.argv[1:]:
        found = hwaware.decompose(*get_model(name, small=True))
        families[name] = sorted({k.family for k in found.kernels})
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tvm", "tvm_ffi"))
    print(json.dumps({"families": families, "tvm": loaded}))
''')


def test_decompose_does_not_import_tvm() -> None:
    done = subprocess.run([sys.executable, "-c", DECOMPOSE_WITHOUT_TVM, *FAMILY_OF_MODEL],
                          cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, family in FAMILY_OF_MODEL.items():
        assert family in result["families"][name], (name, result["families"][name])
    assert result["tvm"] == []


def _tvm_imports(tree: ast.Module) -> list[int]:
    """Lines that import TVM (at module level or inside functions)."""
    lines = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        if any(n.split(".")[0] in TVM_MODULES for n in names):
            lines.append(node.lineno)
    return lines


def test_only_the_tvm_package_and_lowering_modules_import_tvm() -> None:
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        lines = _tvm_imports(ast.parse(path.read_text()))
        if lines and not rel.startswith("hwaware/tvm/") and rel not in LOWERING_MODULES:
            offending.append(f"{rel}:{lines}")
    assert offending == []


def test_every_family_has_its_lowering_module() -> None:
    from hwaware.kernels import families

    lowering = {f"hwaware/kernels/{f.lowering.rpartition('.')[2]}.py" for f in families().values()}
    assert lowering == LOWERING_MODULES - {"hwaware/kernels/lowering_common.py"}
    assert all((ROOT / path).is_file() for path in lowering)


def test_supported_ops_table_matches_tvm() -> None:
    assert SUPPORTED_ATEN_OPS == tvm_supported_aten_ops()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported (`if TYPE_CHECKING:` blocks left out)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            yield from _module_level_imports(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _module_level_imports(node.body + node.orelse + node.finalbody)


def _imported(node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The hwaware modules an import statement imports (`from pkg import submodule` counts)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: {m for node in _module_level_imports(ast.parse(path.read_text()).body)
                   for m in _imported(node, modules)} - {name}
            for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def test_cycle_search_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_import_cycles() -> None:
    graph = _import_graph()
    assert "hwaware.pipeline" in graph["hwaware"] and graph["hwaware.tvm.search"]
    assert _cycle(graph) is None
