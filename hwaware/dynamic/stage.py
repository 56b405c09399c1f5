"""Dynamic networks, step 1 (stage): a module's `forward` -> one normalized Python function.

Reads the source of `forward` (and of every user submodule whose forward has control flow) and
rewrites it so that every `if`/`while`/`for` left is a decision that can only be made at run
time:
- expressions that only read the model (`self.threshold`, `len(self.blocks)`,
  `self.downsample is None`) become constants, and branches on constants are decided now;
- loops over ModuleLists (`for blk in self.blocks`, `zip(...)`, `enumerate(...)`, and `range`
  loops whose counter picks a submodule) are unrolled, so each iteration names its own
  submodule (`self.blocks[2]`); `break`/`continue` become breaks out of a one-pass loop;
- a ModuleList indexed by a run-time int (`self.experts[idx](x)`) becomes an if-chain;
- calls to user submodules whose own forward branches are inlined (locals renamed, `return`
  turned into an assignment).
Each statement remembers its file and line (for warnings) and the globals it must run with.
"""

from __future__ import annotations

import ast
import copy
import inspect
import itertools
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

MAX_UNROLL = 64
SCALARS = (int, float, bool, str, type(None))
STATIC_CALLS = {"isinstance", "hasattr", "getattr", "len", "type", "callable"}


class StagingError(Exception):
    """The forward uses a construct hwaware cannot rewrite (the caller falls back)."""


@dataclass(frozen=True)
class Origin:
    """Where a statement comes from, and the globals its code runs with."""

    filename: str
    lineno: int
    globals_id: int

    def where(self) -> str:
        return f"{self.filename}:{self.lineno}"


@dataclass
class Staged:
    """The model's forward as one function body over `self` (the root module) and `params`."""

    root: torch.nn.Module
    params: list[str]
    body: list[ast.stmt]
    globals: dict[int, dict[str, Any]] = field(default_factory=dict)
    filename: str = ""
    defaults: list[ast.expr] = field(default_factory=list)  # of the last params, as written


def origin_of(node: ast.AST) -> Origin:
    return getattr(node, "_hw_origin")  # noqa: B009 - set on every staged statement


def stage(model: torch.nn.Module) -> Staged:
    """Normalize `type(model).forward` (see the module docstring)."""
    return _Stager(model).run()


# ----------------------------------------------------------------------------- source
T = TypeVar("T")


def _per_class(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """Cache a function of a class (classes are hashable; mypy cannot see it for Module)."""
    cache: dict[int, tuple[Any, T]] = {}

    def cached(cls: Any) -> T:
        if id(cls) not in cache:
            cache[id(cls)] = (cls, fn(cls))
        return cache[id(cls)][1]

    return cached


@_per_class
def _forward_ast(cls: Any) -> tuple[ast.FunctionDef, str]:
    fn = cls.forward
    try:
        lines, start = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or "<unknown>"
    except (OSError, TypeError) as err:
        raise StagingError(f"source of {cls.__name__}.forward is not available") from err
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, start - 1)
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef):
        raise StagingError(f"{cls.__name__}.forward is not a plain function")
    a = func.args
    if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs:
        raise StagingError(f"{filename}:{func.lineno}: forward with *args/**kwargs/keyword-only "
                           "parameters is not supported")
    return func, filename


def _is_user_module(m: Any) -> bool:
    return isinstance(m, torch.nn.Module) and not type(m).__module__.startswith("torch.")


@_per_class
def has_control_flow(cls: Any) -> bool:
    """Does this class's forward branch, loop or read a tensor value into Python?"""
    try:
        func, _ = _forward_ast(cls)
    except StagingError:
        return False
    for node in ast.walk(func):
        if isinstance(node, (ast.If, ast.While, ast.For, ast.IfExp, ast.Break)):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "item":
            return True
    return False


# --------------------------------------------------------------------------- helpers
def _assigned_names(nodes: list[ast.stmt]) -> set[str]:
    names: set[str] = set()
    for stmt in nodes:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                names.add(n.id)
    return names


def _loaded_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


class _Substitute(ast.NodeTransformer):
    """Replace loaded names by expressions (loop variables, `self`, renamed locals)."""

    def __init__(self, mapping: dict[str, ast.expr], rename: dict[str, str] | None = None):
        self.mapping = mapping
        self.rename = rename or {}

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and node.id in self.mapping:
            return ast.copy_location(copy.deepcopy(self.mapping[node.id]), node)
        if node.id in self.rename:
            return ast.copy_location(ast.Name(self.rename[node.id], node.ctx), node)
        return node


def _jumps(stmts: list[ast.stmt]) -> set[str]:
    """'break'/'continue'/'return' directly in `stmts` (not inside nested loops)."""
    found: set[str] = set()

    def walk(node: ast.AST, in_loop: bool) -> None:
        if isinstance(node, ast.Break) and not in_loop:
            found.add("break")
        elif isinstance(node, ast.Continue) and not in_loop:
            found.add("continue")
        elif isinstance(node, ast.Return):
            found.add("return" if not in_loop else "return-in-loop")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            walk(child, in_loop or isinstance(node, (ast.For, ast.While)))

    for s in stmts:
        walk(s, False)
    return found


class _ReplaceJumps(ast.NodeTransformer):
    """Turn `continue` into `break` (one-pass loop) and `return e` into `target = e; break`."""

    def __init__(self, continue_to_break: bool = False, return_target: str | None = None):
        self.continue_to_break = continue_to_break
        self.return_target = return_target

    def visit_For(self, node: ast.For) -> ast.AST:
        return node  # jumps inside nested loops belong to them

    def visit_While(self, node: ast.While) -> ast.AST:
        return node

    def visit_list(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for s in stmts:
            r = self.visit(s)
            out.extend(r if isinstance(r, list) else [r])
        return out

    def visit_Continue(self, node: ast.Continue) -> ast.AST:
        return ast.copy_location(ast.Break(), node) if self.continue_to_break else node

    def visit_Return(self, node: ast.Return) -> Any:
        if self.return_target is None:
            return node
        value = node.value if node.value is not None else ast.Constant(None)
        assign = ast.copy_location(
            ast.Assign([ast.Name(self.return_target, ast.Store())], value), node)
        return [assign, ast.copy_location(ast.Break(), node)]


def _once_loop(body: list[ast.stmt], like: ast.stmt) -> ast.For:
    loop = ast.For(ast.Name("_hw_once", ast.Store()),
                   ast.Call(ast.Name("range", ast.Load()), [ast.Constant(1)], []), body, [])
    loop._hw_keep = True  # type: ignore[attr-defined]  # never unroll
    return ast.copy_location(loop, like)


def _set_origin(nodes: list[ast.stmt], origin_file: str, globals_id: int) -> None:
    for stmt in nodes:
        for n in ast.walk(stmt):
            if isinstance(n, ast.stmt):
                n._hw_origin = Origin(origin_file, getattr(n, "lineno", 0), globals_id)  # type: ignore[attr-defined]


def _fix(nodes: list[ast.stmt], like: ast.stmt) -> list[ast.stmt]:
    """New statements take the position and origin of the statement they come from."""
    origin = origin_of(like)
    for stmt in nodes:
        for n in ast.walk(stmt):
            if isinstance(n, (ast.stmt, ast.expr)) and not hasattr(n, "lineno"):
                ast.copy_location(n, like)
            if isinstance(n, ast.stmt) and not hasattr(n, "_hw_origin"):
                n._hw_origin = origin  # type: ignore[attr-defined]
    return nodes


# --------------------------------------------------------------------------- stager
class _Stager:
    def __init__(self, root: torch.nn.Module):
        self.root = root
        self.globals: dict[int, dict[str, Any]] = {}
        self.counter = itertools.count()
        self.locals: set[str] = set()

    def run(self) -> Staged:
        func, filename = _forward_ast(type(self.root))
        func = copy.deepcopy(func)
        fn_globals = type(self.root).forward.__globals__
        self.globals[id(fn_globals)] = fn_globals
        _set_origin(func.body, filename, id(fn_globals))
        params = [a.arg for a in func.args.args[1:]]
        self.locals = set(params) | _assigned_names(func.body)
        defaults: list[ast.expr] = [d for d in func.args.defaults if isinstance(d, ast.Constant)]
        if len(defaults) != len(func.args.defaults):
            defaults = []  # a computed default: callers pass every argument
        return Staged(self.root, params, self.block(func.body), self.globals, filename,
                      defaults)

    def fresh(self, stem: str) -> str:
        name = f"_hw_{stem}{next(self.counter)}"
        self.locals.add(name)
        return name

    # -------------------------------------------------------------- static values
    def static_value(self, expr: ast.expr) -> tuple[bool, Any]:
        """(True, value) when `expr` reads only the model and globals (no locals, no tensors
        computed from inputs); (False, None) otherwise."""
        if _loaded_names(expr) & (self.locals - {"self"}):
            return False, None
        for n in ast.walk(expr):
            if isinstance(n, ast.Call) and not (
                isinstance(n.func, ast.Name) and n.func.id in STATIC_CALLS
            ):
                return False, None
            if isinstance(n, (ast.Lambda, ast.NamedExpr, ast.ListComp, ast.GeneratorExp)):
                return False, None
        env = dict(self._globals_for(expr))
        env["self"] = self.root
        try:
            code = compile(ast.fix_missing_locations(ast.Expression(copy.deepcopy(expr))),
                           "<static>", "eval")
            return True, eval(code, env)  # noqa: S307 - reads model attributes only
        except Exception:  # noqa: BLE001 - not statically known; left to run time
            return False, None

    def _globals_for(self, node: ast.AST) -> dict[str, Any]:
        origin = getattr(node, "_hw_origin", None)
        if origin is not None:
            return self.globals[origin.globals_id]
        return next(iter(self.globals.values()))

    def fold(self, expr: ast.expr, stmt: ast.stmt) -> ast.expr:
        """Replace sub-expressions that read only the model by constants."""
        stager = self

        class Folder(ast.NodeTransformer):
            def generic_visit(self, node: ast.AST) -> ast.AST:
                if isinstance(node, ast.expr) and not isinstance(node, (ast.Constant, ast.Name)):
                    node._hw_origin = origin_of(stmt)  # type: ignore[attr-defined]
                    ok, value = stager.static_value(node)  # type: ignore[arg-type]
                    if ok and _is_constant(value):
                        return ast.copy_location(ast.Constant(value), node)
                return super().generic_visit(node)

            def visit_Name(self, node: ast.Name) -> ast.AST:
                if isinstance(node.ctx, ast.Load) and node.id not in stager.locals:
                    node._hw_origin = origin_of(stmt)  # type: ignore[attr-defined]
                    ok, value = stager.static_value(node)
                    if ok and isinstance(value, (int, float, bool)) and node.id != "self":
                        return ast.copy_location(ast.Constant(value), node)
                return node

        return Folder().visit(expr)  # type: ignore[no-any-return]

    # -------------------------------------------------------------- statements
    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in stmts:
            out.extend(self.statement(stmt))
            if out and isinstance(out[-1], (ast.Return, ast.Raise)):
                break  # the rest is unreachable (e.g. after a branch decided at compile time)
        return out

    def statement(self, stmt: ast.stmt) -> list[ast.stmt]:
        if isinstance(stmt, ast.If):
            return self.if_(stmt)
        if isinstance(stmt, ast.While):
            return self.while_(stmt)
        if isinstance(stmt, ast.For):
            return self.for_(stmt)
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return)):
            return self.simple(stmt)
        return [stmt]

    def if_(self, stmt: ast.If) -> list[ast.stmt]:
        stmt.test = self.fold(stmt.test, stmt)
        ok, value = self.static_value(stmt.test)
        if ok:
            return self.block(stmt.body if value else stmt.orelse)
        stmt.body = self.block(stmt.body) or _fix([ast.Pass()], stmt)
        stmt.orelse = self.block(stmt.orelse)
        return [stmt]

    def while_(self, stmt: ast.While) -> list[ast.stmt]:
        if stmt.orelse:
            raise StagingError(f"{origin_of(stmt).where()}: while ... else is not supported")
        stmt.test = self.fold(stmt.test, stmt)
        ok, value = self.static_value(stmt.test)
        if ok and not value:
            return []
        stmt.body = self.block(stmt.body)
        return [stmt]

    def for_(self, stmt: ast.For) -> list[ast.stmt]:
        if stmt.orelse:
            raise StagingError(f"{origin_of(stmt).where()}: for ... else is not supported")
        if getattr(stmt, "_hw_keep", False):
            stmt.body = self.block(stmt.body)
            return [stmt]
        stmt.iter = self.fold(stmt.iter, stmt)
        bindings = self.iteration_bindings(stmt)
        if bindings is None:
            stmt.body = self.block(stmt.body)
            return [stmt]
        return self.unroll(stmt, bindings)

    def iteration_bindings(self, stmt: ast.For) -> list[dict[str, ast.expr]] | None:
        items = self.static_items(stmt.iter)
        if items is None or len(items) > MAX_UNROLL:
            return None
        is_range = isinstance(stmt.iter, ast.Call) and isinstance(stmt.iter.func, ast.Name) \
            and stmt.iter.func.id == "range"
        if is_range and not self.counter_picks_module(stmt):
            return None  # a plain counted loop stays a loop (one region reused per trip)
        out = []
        for item in items:
            binding: dict[str, ast.expr] = {}
            if not _bind(stmt.target, item, binding):
                return None
            out.append(binding)
        return out

    def static_items(self, it: ast.expr) -> list[ast.expr] | None:
        """The per-iteration values of a loop over the model's structure, as expressions."""
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name):
            name, args = it.func.id, it.args
            if name == "range":
                ok, value = self.static_value(it)
                return [ast.Constant(i) for i in value] if ok else None
            if name == "zip" and args:
                parts = [self.static_items(a) for a in args]
                if any(p is None for p in parts):
                    return None
                return [ast.Tuple(list(t), ast.Load())
                        for t in zip(*parts, strict=False)]  # type: ignore[misc]
            if name == "enumerate" and len(args) == 1:
                inner = self.static_items(args[0])
                if inner is None:
                    return None
                return [ast.Tuple([ast.Constant(i), e], ast.Load()) for i, e in enumerate(inner)]
            if name == "reversed" and len(args) == 1:
                inner = self.static_items(args[0])
                return None if inner is None else inner[::-1]
        if isinstance(it, (ast.Tuple, ast.List)):
            return list(it.elts)
        ok, value = self.static_value(it)
        if ok and isinstance(value, (torch.nn.ModuleList, torch.nn.Sequential)):
            return [ast.Subscript(copy.deepcopy(it), ast.Constant(i), ast.Load())
                    for i in range(len(value))]
        if ok and isinstance(value, (tuple, list)) and all(_is_constant(v) for v in value):
            return [ast.Constant(v) for v in value]
        return None

    def counter_picks_module(self, stmt: ast.For) -> bool:
        if not isinstance(stmt.target, ast.Name):
            return False
        var = stmt.target.id
        for node in ast.walk(ast.Module(stmt.body, [])):
            if isinstance(node, ast.Subscript) and var in _loaded_names(node.slice):
                ok, value = self.static_value(node.value)
                if ok and isinstance(value, (torch.nn.ModuleList, torch.nn.Sequential, list,
                                             tuple)):
                    return True
        return False

    def unroll(self, stmt: ast.For, bindings: list[dict[str, ast.expr]]) -> list[ast.stmt]:
        jumps = _jumps(stmt.body)
        if {"break", "continue"} <= jumps:
            raise StagingError(f"{origin_of(stmt).where()}: a loop with both break and "
                               "continue is not supported")
        copies: list[list[ast.stmt]] = []
        for binding in bindings:
            body = [_Substitute(binding).visit(copy.deepcopy(s)) for s in stmt.body]
            if "continue" in jumps:
                body = [_once_loop(_ReplaceJumps(continue_to_break=True).visit_list(body), stmt)]
            copies.append(body)
        flat = [s for body in copies for s in body]
        if "break" in jumps:
            flat = [_once_loop(flat, stmt)]
        return self.block(flat)

    # --------------------------------------------------------------- simple ones
    def simple(self, stmt: ast.stmt) -> list[ast.stmt]:
        for fld in ("value",):
            value = getattr(stmt, fld, None)
            if isinstance(value, ast.expr):
                setattr(stmt, fld, self.fold(value, stmt))
        dispatch = self.dynamic_index_call(stmt)
        if dispatch is not None:
            return dispatch
        return self.inline_calls(stmt)

    def dynamic_index_call(self, stmt: ast.stmt) -> list[ast.stmt] | None:
        """`y = self.experts[idx](x)` -> `if idx == 0: y = self.experts[0](x) elif ...`."""
        for node in ast.walk(stmt):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)):
                continue
            sub = node.func
            ok_c, container = self.static_value(sub.value)
            ok_i, _ = self.static_value(sub.slice)
            if not ok_c or ok_i or not isinstance(container, (torch.nn.ModuleList,
                                                              torch.nn.Sequential)):
                continue
            index = sub.slice
            pre: list[ast.stmt] = []
            if not isinstance(index, ast.Name):
                tmp = self.fresh("idx")
                pre = _fix([ast.Assign([ast.Name(tmp, ast.Store())], index)], stmt)
                index = ast.Name(tmp, ast.Load())
            chain: list[ast.stmt] = _fix([ast.Raise(ast.Call(
                ast.Name("IndexError", ast.Load()),
                [ast.Constant(f"{origin_of(stmt).where()}: index out of range for a "
                              f"ModuleList of {len(container)}")], []), None)], stmt)
            for i in reversed(range(len(container))):
                sub.slice = ast.Constant(i)
                arm = copy.deepcopy(stmt)
                test = ast.Compare(copy.deepcopy(index), [ast.Eq()], [ast.Constant(i)])
                chain = _fix([ast.If(test, self.statement(arm), chain)], stmt)
            return pre + chain
        return None

    def inline_calls(self, stmt: ast.stmt) -> list[ast.stmt]:
        """Inline calls to user submodules whose forward branches (see `has_control_flow`)."""
        for node in ast.walk(stmt):
            if isinstance(node, ast.Call):
                ok, callee = self.static_value(node.func)
                if ok and _is_user_module(callee) and has_control_flow(type(callee)):
                    return self.inline(stmt, node, callee)
        return [stmt]

    def inline(self, stmt: ast.stmt, call: ast.Call, callee: torch.nn.Module) -> list[ast.stmt]:
        if call.keywords:
            raise StagingError(f"{origin_of(stmt).where()}: keyword arguments to an inlined "
                               "submodule call are not supported")
        func, filename = _forward_ast(type(callee))
        func = copy.deepcopy(func)
        fn_globals = type(callee).forward.__globals__
        self.globals[id(fn_globals)] = fn_globals
        _set_origin(func.body, filename, id(fn_globals))
        prefix = f"_hw_{type(callee).__name__.lower()}{next(self.counter)}_"
        params = [a.arg for a in func.args.args[1:]]
        local_names = set(params) | _assigned_names(func.body)
        rename = {n: prefix + n for n in local_names}
        self.locals |= set(rename.values())
        self_expr = call.func
        body = [_Substitute({"self": self_expr}, rename).visit(s) for s in func.body]
        missing = len(params) - len(call.args)
        defaults = func.args.defaults
        args = list(call.args)
        if 0 < missing <= len(defaults):
            args += defaults[len(defaults) - missing:]
        if len(args) != len(params):
            raise StagingError(f"{origin_of(stmt).where()}: {type(callee).__name__} takes "
                               f"{len(params)} argument(s), got {len(call.args)}")
        binds = _fix([ast.Assign([ast.Name(rename[p], ast.Store())], a)
                      for p, a in zip(params, args, strict=True)], stmt)
        result = self.fresh("ret")
        jumps = _jumps(body)
        if "return-in-loop" in jumps:
            raise StagingError(f"{filename}:{func.lineno}: return inside a loop of an inlined "
                               "submodule is not supported")
        if isinstance(body[-1], ast.Return) and sum(
                isinstance(n, ast.Return) for s in body for n in ast.walk(s)) == 1:
            last = body[-1]
            assert isinstance(last, ast.Return)
            body[-1] = ast.copy_location(ast.Assign(
                [ast.Name(result, ast.Store())], last.value or ast.Constant(None)), last)
            body[-1]._hw_origin = origin_of(last)  # type: ignore[attr-defined]
        else:
            body = [_once_loop(_ReplaceJumps(return_target=result).visit_list(body), stmt)]
            _fix(body, stmt)
        replaced = _ReplaceNode(call, ast.Name(result, ast.Load())).visit(stmt)
        return self.block(binds + body) + self.statement(replaced)


class _ReplaceNode(ast.NodeTransformer):
    def __init__(self, old: ast.AST, new: ast.AST):
        self.old, self.new = old, new

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if node is self.old:
            return ast.copy_location(self.new, node)
        return super().generic_visit(node)


def _bind(target: ast.expr, item: ast.expr, binding: dict[str, ast.expr]) -> bool:
    if isinstance(target, ast.Name):
        binding[target.id] = item
        return True
    if isinstance(target, ast.Tuple) and isinstance(item, ast.Tuple) and \
            len(target.elts) == len(item.elts):
        return all(_bind(t, i, binding) for t, i in zip(target.elts, item.elts, strict=True))
    return False


def _is_constant(value: Any) -> bool:
    if isinstance(value, SCALARS):
        return True
    return isinstance(value, tuple) and all(isinstance(v, SCALARS) for v in value)
