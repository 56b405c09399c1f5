"""The package's structure: where TVM may be imported, and no import cycles.

(a) capture -> rewrite -> partition (`hwaware.decompose`) runs without importing TVM, on a model
with a fused conv block, a GNN layer and an attention layer; (b) only `hwaware/tvm/` and the
kernel families' lowering code import TVM; the static table of supported ATen ops equals the
installed TVM's; (c) the package's module-level imports form no cycle.
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
# lowering modules: they import TVM at module level (imported only to lower or schedule)
LOWERING_MODULES = {"hwaware/kernels/attention_kernel.py"}

DECOMPOSE_WITHOUT_TVM = textwrap.dedent('''
    import json, sys
    import torch
    from torch import nn
    import hwaware

    class Block(nn.Module):  # MobileNetV2 block: the conv_block family
        def __init__(self, c=8, hidden=24):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return x + self.body(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.lin = Block().eval(), nn.Linear(16, 16)

        def forward(self, image, nodes, src, dst, q):
            message = torch.zeros_like(nodes).index_add_(0, dst, nodes.index_select(0, src))
            attention = nn.functional.scaled_dot_product_attention(q, q, q)
            return self.block(image), self.lin(message), attention

    torch.manual_seed(0)
    edges = torch.randint(0, 10, (2, 30))
    inputs = (torch.randn(1, 8, 14, 14), torch.randn(10, 16), edges[0], edges[1],
              torch.randn(1, 2, 16, 8))
    found = hwaware.decompose(Model().eval(), inputs)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tvm", "tvm_ffi"))
    print(json.dumps({"families": sorted({k.family for k in found.kernels}), "tvm": loaded}))
''')


def test_decompose_does_not_import_tvm() -> None:
    done = subprocess.run([sys.executable, "-c", DECOMPOSE_WITHOUT_TVM], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"conv_block", "gnn", "attention"} <= set(result["families"]), result["families"]
    assert result["tvm"] == []


def _tvm_imports(tree: ast.Module) -> tuple[list[int], list[int]]:
    """Lines that import TVM at module level, and inside functions."""
    top = {id(n) for n in tree.body}
    module_level, in_functions = [], []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        if any(n.split(".")[0] in TVM_MODULES for n in names):
            (module_level if id(node) in top else in_functions).append(node.lineno)
    return module_level, in_functions


def test_only_the_tvm_package_and_lowering_code_import_tvm() -> None:
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("hwaware/tvm/"):
            continue
        module_level, in_functions = _tvm_imports(ast.parse(path.read_text()))
        if module_level and rel not in LOWERING_MODULES:
            offending.append(f"{rel}:{module_level} (module level)")
        # the kernel families' lowering functions import TVM where they run
        if in_functions and not rel.startswith("hwaware/kernels/"):
            offending.append(f"{rel}:{in_functions}")
    assert offending == []


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
