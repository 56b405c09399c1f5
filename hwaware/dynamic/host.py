"""Dynamic networks: the host program's declarative form (`host_program.json`) and its checks.

Goes in: the host program `split` generated (`HostPlan.source()`: control flow, arithmetic on
Python scalars, the containers the forward builds, and calls `region_k(...)` to compiled
regions). Comes out: `to_json`, its syntax tree as a JSON document, which a save writes; and
`from_json`, which a load reads back into a syntax tree that `DynamicModel` compiles into the
forward. No text from a saved folder is ever executed: `host_program.py` is for people.

Both directions check the tree (`check`), so a save never writes what a load refuses:
- only the node types the splitter emits (`NODE_TYPES`): one top-level `def forward`,
  assignments, `if` / `while` / `for`, `return` / `break` / `raise`, expressions on scalars,
  containers, calls; no imports, no nested functions or classes, no lambdas, no `global`;
- names read are the forward's parameters, values it assigns, its regions, or
  `split.HOST_BUILTINS` (`len`, `range`, `int`, `math`, ...); no name has two leading
  underscores;
- attributes are the few a host program reads (`ATTRIBUTES`: a tensor's `.item()` or `.shape`,
  a list's `.append`) or public functions of `math`; none is assigned.
The forward then runs with only `HOST_BUILTINS` as its builtins (`namespace`).
"""

from __future__ import annotations

import ast
import builtins
import math
from collections.abc import Callable, Collection
from typing import Any

from hwaware.dynamic.split import HOST_BUILTINS, SHAPE_METHODS, SIDE_EFFECT_METHODS
from hwaware.dynamic.stage import VALUE_READS

HOST_FORMAT_VERSION = 1
HOST_FILE = "host_program.json"

NODE_TYPES: dict[str, type[ast.AST]] = {cls.__name__: cls for cls in (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.keyword,
    # statements
    ast.Assign, ast.AugAssign, ast.AnnAssign, ast.If, ast.While, ast.For, ast.Return,
    ast.Break, ast.Continue, ast.Raise, ast.Assert, ast.Expr, ast.Pass,
    # expressions
    ast.Name, ast.Constant, ast.Tuple, ast.List, ast.Dict, ast.Set, ast.Call, ast.Attribute,
    ast.Subscript, ast.Slice, ast.Starred, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare,
    ast.IfExp, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension,
    ast.JoinedStr, ast.FormattedValue,
    # contexts and operators
    ast.Load, ast.Store, ast.Add, ast.Sub, ast.Mult, ast.MatMult, ast.Div, ast.FloorDiv,
    ast.Mod, ast.Pow, ast.LShift, ast.RShift, ast.BitOr, ast.BitXor, ast.BitAnd, ast.And,
    ast.Or, ast.Not, ast.Invert, ast.UAdd, ast.USub, ast.Eq, ast.NotEq, ast.Lt, ast.LtE,
    ast.Gt, ast.GtE, ast.Is, ast.IsNot, ast.In, ast.NotIn)}
# a tensor's values and sizes, and the methods of the lists and dicts the host builds
ATTRIBUTES = VALUE_READS | SHAPE_METHODS | (SIDE_EFFECT_METHODS - {"write"}) | {
    "shape", "ndim", "dtype", "keys", "values", "items", "get", "index", "count"}
MATH_FUNCTIONS = frozenset(n for n in dir(math) if not n.startswith("_"))
_CONSTANTS = (str, int, float, bool, type(None))


class HostProgramError(ValueError):
    """A host program uses a construct outside what hwaware generates (see the module doc)."""


# ------------------------------------------------------------------------------ JSON
def to_json(source: str, regions: Collection[str]) -> dict[str, Any]:
    """The host program `source` as a JSON document (checked first, as a load will)."""
    tree = ast.parse(source)
    check(tree, regions, "the host program to save")
    return {"format_version": HOST_FORMAT_VERSION, "forward": _encode(tree)}


def from_json(doc: Any, regions: Collection[str], where: str) -> ast.Module:
    """The host program's syntax tree from the document `to_json` wrote; raises
    `HostProgramError` naming `where` (the file) and the construct it refuses."""
    if not isinstance(doc, dict) or doc.get("format_version") != HOST_FORMAT_VERSION:
        raise HostProgramError(f"{where}: not a host program of format {HOST_FORMAT_VERSION}")
    try:
        tree = _decode(doc["forward"])
    except HostProgramError as err:
        raise HostProgramError(f"{where}: {err}") from None
    if not isinstance(tree, ast.Module):
        raise HostProgramError(f"{where}: the document is not a module")
    check(tree, regions, where)
    return ast.fix_missing_locations(tree)


def _encode(node: Any) -> Any:
    if isinstance(node, ast.AST):
        kind = type(node).__name__
        if kind not in NODE_TYPES:
            raise HostProgramError(f"construct {kind!r} is not allowed in a host program")
        return {"_": kind, **{f: _encode(getattr(node, f)) for f in node._fields
                              if hasattr(node, f)}}
    if isinstance(node, list):
        return [_encode(x) for x in node]
    if isinstance(node, _CONSTANTS):
        return node
    raise HostProgramError(f"value {node!r} of type {type(node).__name__} is not allowed "
                           "in a host program")


def _decode(doc: Any) -> Any:
    if isinstance(doc, dict):
        cls = NODE_TYPES.get(doc.get("_"))  # type: ignore[arg-type]
        if cls is None:
            raise HostProgramError(f"construct {doc.get('_')!r} is not allowed in a host "
                                   "program")
        fields = {k: _decode(v) for k, v in doc.items() if k != "_"}
        unknown = set(fields) - set(cls._fields)
        if unknown:
            raise HostProgramError(f"{cls.__name__} has no fields {sorted(unknown)}")
        return cls(**fields)
    if isinstance(doc, list):
        return [_decode(x) for x in doc]
    if isinstance(doc, _CONSTANTS):
        return doc
    raise HostProgramError(f"value {doc!r} is not allowed in a host program")


# ----------------------------------------------------------------------------- checks
def check(tree: ast.Module, regions: Collection[str], where: str) -> None:
    """Refuse, naming `where`, a tree that is not a host program hwaware writes (or region
    names that could stand for anything but a region)."""
    body = tree.body
    if len(body) != 1 or not isinstance(body[0], ast.FunctionDef) or body[0].name != "forward" \
            or body[0].decorator_list or body[0].returns is not None:
        raise HostProgramError(f"{where}: a host program is exactly one `def forward(...)`")
    bad = [r for r in regions if not (isinstance(r, str) and r.isidentifier())
           or r.startswith("_") or r in HOST_BUILTINS]
    if bad:
        raise HostProgramError(f"{where}: {bad[0]!r} is not a region name")
    forward = body[0]
    nodes = [n for n in ast.walk(forward) if n is not forward]
    stored = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    params = {a.arg for a in forward.args.args}
    known = params | stored | set(regions) | HOST_BUILTINS
    for node in nodes:
        why = _refused(node, known)
        if why:
            raise HostProgramError(f"{where}: {why}")


def _refused(node: ast.AST, known: set[str]) -> str | None:
    """Why `node` may not be in a host program, or None."""
    if type(node).__name__ not in NODE_TYPES or type(node) is ast.FunctionDef:
        return f"construct {type(node).__name__!r} is not allowed"
    names = [node.id] if isinstance(node, ast.Name) else [node.arg] \
        if isinstance(node, (ast.arg, ast.keyword)) and node.arg else []
    if any(not isinstance(n, str) or not n.isidentifier() or n.startswith("__") for n in names):
        return f"name {names[0]!r} is not allowed"
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in known:
        return f"name {node.id!r} is neither a parameter, a value the program assigns, a " \
               "region nor an allowed builtin"
    if isinstance(node, ast.Attribute):
        return _refused_attribute(node)
    if isinstance(node, ast.Constant) and not isinstance(node.value, _CONSTANTS):
        return f"constant {node.value!r} is not allowed"
    return None


def _refused_attribute(node: ast.Attribute) -> str | None:
    if not isinstance(node.ctx, ast.Load):
        return f"assigning attribute {node.attr!r} is not allowed"
    on_math = isinstance(node.value, ast.Name) and node.value.id == "math"
    if node.attr in (MATH_FUNCTIONS if on_math else ATTRIBUTES):
        return None
    return f"attribute {node.attr!r} is not allowed (allowed: {sorted(ATTRIBUTES)}, and " \
           "math's functions)"


# ---------------------------------------------------------------------------- running
def namespace(runners: dict[str, Any], decide: Callable[[int, Any], bool] | None
              ) -> dict[str, Any]:
    """The globals a host program runs in: its regions, `math`, and only the builtins of
    `HOST_BUILTINS` (plus `_hw_decide` while exploring branches at compile time)."""
    allowed = {n: getattr(builtins, n) for n in sorted(HOST_BUILTINS) if hasattr(builtins, n)}
    ns: dict[str, Any] = {"__builtins__": allowed, "math": math, **runners}
    if decide is not None:
        ns["_hw_decide"] = decide
    return ns


def make_forward(program: str | ast.Module, filename: str, ns: dict[str, Any]
                 ) -> Callable[..., Any]:
    """The `forward` function of a host program: hwaware's own source at compile time, or the
    checked tree `from_json` read on load (never text from a saved folder)."""
    exec(compile(program, filename, "exec"), ns)  # noqa: S102 - see the docstring
    return ns["forward"]  # type: ignore[no-any-return]
