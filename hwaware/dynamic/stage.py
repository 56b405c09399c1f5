"""Dynamic networks, step 1 (stage): a module's `forward` -> one normalized Python function.

Reads the source of `forward` (and of every user submodule whose forward has control flow) and
rewrites it so that every `if`/`while`/`for` left is a decision that can only be made at run
time:
- expressions that only read the model (`self.threshold`, `len(self.blocks)`,
  `self.downsample is None`) become constants, and branches on constants are decided now;
- loops over ModuleLists (`for blk in self.blocks`, `zip(...)`, `enumerate(...)`, and `range`
  loops whose counter picks a submodule, `getattr(self, f"head{i}")` included) are unrolled,
  so each iteration names its own submodule (`self.blocks[2]`); `break`/`continue` become
  breaks out of a one-pass loop (`for ... else` reads a flag); list comprehensions over them
  become lists;
- a ModuleList (ModuleDict) indexed by a run-time value (`self.experts[idx](x)`) becomes an
  if-chain; a local naming a submodule (`expert = self.experts[idx]`) is replaced by it;
- calls to user submodules, helper methods (`self._run(x)`, `blk.decide(h)`) and plain
  functions whose code branches (directly or in what they call) are inlined: locals renamed,
  constant and submodule arguments substituted, `return` turned into an assignment, and a
  returned tuple `return out, steps` into one name per element, so `self._run(x)[0]` and
  `logits, done = self._maybe_exit(h, i)` read plain names;
- `a if c else b` on a run-time `c` becomes an `if` statement, and an `if`/`while` test
  `A or B(...)` is evaluated in steps, so `B` still only runs when `A` does not decide;
- `with torch.no_grad():` blocks are flattened (compiled models run without autograd).
Each statement remembers its file and line (for warnings) and the globals it must run with.
"""

from __future__ import annotations

import ast
import builtins
import copy
import inspect
import itertools
import logging
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

MAX_UNROLL = 64
SCALARS = (int, float, bool, str, type(None))
STATIC_CALLS = {"isinstance", "hasattr", "getattr", "len", "type", "callable", "range"}


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
MAX_INLINE_DEPTH = 32
VALUE_READS = {"item", "tolist"}  # tensor methods that read values into Python


def _per_object(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """Cache a function of a class or function (kept alive by the cache, so ids stay valid)."""
    cache: dict[int, tuple[Any, T]] = {}

    def cached(obj: Any) -> T:
        if id(obj) not in cache:
            cache[id(obj)] = (obj, fn(obj))
        return cache[id(obj)][1]

    return cached


@_per_object
def _function_ast(fn: Any) -> tuple[ast.FunctionDef, str]:
    """The parsed source of a Python function (a forward, a helper method), at its real lines,
    positional-only parameters read as plain positional ones."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        lines, start = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or "<unknown>"
    except (OSError, TypeError) as err:
        raise StagingError(f"the source of {name} is not available (defined by exec or "
                           "in an interactive session)") from err
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, start - 1)
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef) or func.name != fn.__name__:
        raise StagingError(f"{name} is not a plain function (a lambda, or made at run time)")
    func.args.args = func.args.posonlyargs + func.args.args
    func.args.posonlyargs = []
    return func, filename


def _plain_parameters(func: ast.FunctionDef, fn: Any, filename: str) -> None:
    """Refuse a function with *args, **kwargs or keyword-only parameters (an inlined call
    binds positional and keyword arguments to plain parameters only)."""
    a = func.args
    if a.vararg or a.kwarg or a.kwonlyargs:
        raise StagingError(f"{filename}:{func.lineno}: {fn.__qualname__} with *args/**kwargs/"
                           "keyword-only parameters is not supported")


@_per_object
def _method_ast(fn: Any) -> tuple[ast.FunctionDef, str]:
    """`_function_ast` of a function called as a method, its receiver (the first parameter,
    whatever its name: `s`, `me`, `this`) renamed `self`, the name the rewrite gives the
    module; a free `self` it also reads (a class defined in a method, closing over that
    method's `self`) becomes `_hw_outer_self` (see `_environment`)."""
    func, filename = _function_ast(fn)
    where = f"{filename}:{func.lineno}: {fn.__qualname__}"
    if not func.args.args:
        raise StagingError(f"{where} has no parameter for the module it is called on")
    receiver = func.args.args[0].arg
    names = [n for n in ast.walk(func) if isinstance(n, (ast.Name, ast.arg))]
    rebinds = [n for n in names if n is not func.args.args[0] and (
        isinstance(n, ast.arg) and n.arg == receiver or
        isinstance(n, ast.Name) and n.id == receiver and not isinstance(n.ctx, ast.Load))]
    if rebinds:
        raise StagingError(f"{where} assigns (or shadows) `{receiver}`, the module it is "
                           "called on")
    if receiver == "self":
        return func, filename
    if any(isinstance(n, ast.arg) and n.arg == "self" for n in names):
        raise StagingError(f"{where} has a parameter `self` that is not its module")
    func = copy.deepcopy(func)
    func.args.args[0].arg = "self"
    for n in ast.walk(func):
        if isinstance(n, ast.Name) and n.id in ("self", receiver):
            n.id = "_hw_outer_self" if n.id == "self" else "self"
    return func, filename


@_per_object
def _environment(fn: Any) -> dict[str, Any]:
    """The names `fn`'s code reads besides its locals: its globals, and the variables of
    enclosing functions it closes over (a model class defined inside a function)."""
    if not fn.__closure__:
        return fn.__globals__  # type: ignore[no-any-return]
    env = {**fn.__globals__, **inspect.getclosurevars(fn).nonlocals}
    if "self" in env:
        env["_hw_outer_self"] = env["self"]  # read as such by a method renaming its receiver
    return env


def _is_grad_mode(call: ast.expr, env: dict[str, Any]) -> bool:
    """Is `call` (a context manager or a decorator) `torch.no_grad()` or the like: no effect
    on the values a compiled model computes?"""
    if not isinstance(call, ast.Call):
        return False
    try:
        code = compile(ast.Expression(call.func), "<static>", "eval")
        value = eval(code, dict(env))  # noqa: S307 - looks up a name, calls nothing
    except Exception:  # noqa: BLE001 - not a name hwaware can look up
        return False
    return value in (torch.no_grad, torch.inference_mode, torch.enable_grad)


def _is_static_method(decorator: ast.expr, env: dict[str, Any]) -> bool:
    """Is `decorator` `staticmethod` (no wrapper: the function is called as written)?"""
    return isinstance(decorator, ast.Name) and \
        env.get(decorator.id, getattr(builtins, decorator.id, None)) is staticmethod


def _mode_queries() -> list[Any]:
    """Functions whose answer is the same for every call of a model run in Python (False)."""
    return [torch.jit.is_scripting, torch.jit.is_tracing, torch.compiler.is_compiling,
            torch.compiler.is_dynamo_compiling]


def _is_user_module(m: Any) -> bool:
    return isinstance(m, torch.nn.Module) and not type(m).__module__.startswith("torch.")


def _is_user_function(fn: Any) -> bool:
    return inspect.isfunction(fn) and not fn.__module__.startswith(("torch.", "hwaware."))


def inline_target(callee: Any) -> tuple[Any, Any] | None:
    """(function, the object it is bound to or None) for a call hwaware can read the code of:
    a user submodule (its forward), a method of one, or a plain user function."""
    if _is_user_module(callee):
        fn, bound = _unwrapped(type(callee).forward), callee
    elif inspect.ismethod(callee) and _is_user_module(callee.__self__) and \
            _is_user_function(callee.__func__):
        fn, bound = _unwrapped(callee.__func__), callee.__self__
    elif _is_user_function(callee):
        fn, bound = _unwrapped(callee), None
    else:
        return None
    return (fn, bound) if fn is not None else None


def _unwrapped(fn: Any) -> Any | None:
    """The function under `fn`'s decorators when they are all grad-mode ones written on its
    def (`@torch.no_grad()`: no effect on the values a compiled model computes); None when a
    wrapper's code is not that (a user decorator, `forward = wrap(f)`): reading the inner
    function's source would leave out what the wrapper does."""
    inner = inspect.unwrap(fn)
    if inner is fn:
        return fn
    try:
        func, _ = _function_ast(inner)
    except StagingError:
        return None
    depth, f = 0, fn
    while f is not inner:
        f, depth = f.__wrapped__, depth + 1
    env = _environment(inner)
    decorators = [d for d in func.decorator_list if not _is_static_method(d, env)]
    ok = len(decorators) == depth and all(_is_grad_mode(d, env) for d in decorators)
    return inner if ok else None


@_per_object
def _branches(fn: Any) -> bool:
    """Does this function's own code branch, loop or read a tensor value into Python?"""
    try:
        func, _ = _function_ast(fn)
    except StagingError:
        return False
    for node in ast.walk(func):
        if isinstance(node, (ast.If, ast.While, ast.For, ast.IfExp, ast.Break)):
            return True
        if isinstance(node, ast.Attribute) and node.attr in VALUE_READS:
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("bool", "int", "float"):
            return True  # `bool(self.gate(h))` reads a tensor value
    return False


def needs_inline(fn: Any, bound: Any, seen: frozenset[tuple[int, int]] = frozenset()) -> bool:
    """Does calling `fn` (bound to `bound`) branch on values, in its own code or in a submodule,
    method or function it calls? Such calls are inlined, so their decisions reach the host."""
    if _branches(fn):
        return True
    seen = seen | {(id(fn), id(bound))}
    try:
        func, _ = _method_ast(fn) if bound is not None else _function_ast(fn)
    except StagingError:
        return False
    for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
        for callee in _resolve(call.func, bound, _environment(fn)):
            target = inline_target(callee)
            if target is not None and (id(target[0]), id(target[1])) not in seen and \
                    needs_inline(*target, seen):
                return True
    return False


def _resolve(expr: ast.expr, bound: Any, fn_globals: dict[str, Any]) -> list[Any]:
    """The objects `expr` may name in code bound to `bound` (every element for a ModuleList
    indexed by a run-time value); [] when not known without running."""
    if isinstance(expr, ast.Name):
        if expr.id == "self":
            return [bound] if bound is not None else []
        return [fn_globals[expr.id]] if expr.id in fn_globals else []
    if isinstance(expr, ast.Attribute):
        return [getattr(v, expr.attr) for v in _resolve(expr.value, bound, fn_globals)
                if hasattr(v, expr.attr)]
    if isinstance(expr, ast.Subscript):
        out: list[Any] = []
        for v in _resolve(expr.value, bound, fn_globals):
            if isinstance(v, (torch.nn.ModuleList, torch.nn.Sequential, list, tuple)):
                i = expr.slice.value if isinstance(expr.slice, ast.Constant) else None
                if isinstance(i, int) and -len(v) <= i < len(v):
                    out.append(v[i])
                else:
                    out.extend(v)
        return out
    return []


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
    """Turn `continue` into `break` (one-pass loop), flag each `break` (`for ... else`), or
    turn `return e` into assignments to `return_targets` and a `break` out of the one-pass loop
    around an inlined body (a return inside a loop also sets `flag`, and every loop holding one
    is followed by `if flag: break`, so the break reaches the one-pass loop)."""

    def __init__(self, continue_to_break: bool = False,
                 return_targets: list[str] | None = None, unpack: bool = False,
                 flag: str = "", break_flag: str = ""):
        self.continue_to_break = continue_to_break
        self.return_targets = return_targets
        self.unpack = unpack
        self.flag = flag
        self.break_flag = break_flag  # `break` -> `break_flag = True; break` (for ... else)
        self.depth = 0  # loops entered inside the one-pass loop

    def visit_For(self, node: ast.For) -> Any:
        return self._loop(node)

    def visit_While(self, node: ast.While) -> Any:
        return self._loop(node)

    def _loop(self, node: ast.For | ast.While) -> Any:
        if self.return_targets is None or "return-in-loop" not in _jumps([node]):
            return node  # jumps inside nested loops belong to them
        self.depth += 1
        node.body = self.visit_list(node.body)
        self.depth -= 1
        check = ast.If(ast.Name(self.flag, ast.Load()), [ast.Break()], [])
        return [node, ast.copy_location(check, node)]

    def visit_list(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for s in stmts:
            r = self.visit(s)
            out.extend(r if isinstance(r, list) else [r])
        return out

    def visit_Continue(self, node: ast.Continue) -> ast.AST:
        return ast.copy_location(ast.Break(), node) if self.continue_to_break else node

    def visit_Break(self, node: ast.Break) -> Any:
        if not self.break_flag:
            return node
        return [ast.Assign([ast.Name(self.break_flag, ast.Store())], ast.Constant(True)), node]

    def visit_Return(self, node: ast.Return) -> Any:
        if self.return_targets is None:
            return node
        out = _return_assigns(node, self.return_targets, self.unpack)
        if self.depth:
            out.append(ast.Assign([ast.Name(self.flag, ast.Store())], ast.Constant(True)))
        return [*out, ast.Break()]


def _tuple_width(returns: list[ast.Return]) -> int | None:
    """The common length of the tuples every `return` gives (`return out, steps`), if any."""
    widths = {len(r.value.elts) if isinstance(r.value, ast.Tuple) and not any(
        isinstance(e, ast.Starred) for e in r.value.elts) else None for r in returns}
    width = widths.pop() if len(widths) == 1 else None
    return width or None


def _return_assigns(node: ast.Return, targets: list[str], unpack: bool) -> list[ast.stmt]:
    """`return e` as `target = e`, or with `unpack`, `return a, b` as `t0 = a; t1 = b`."""
    value = node.value if node.value is not None else ast.Constant(None)
    parts = value.elts if unpack and isinstance(value, ast.Tuple) else [value]
    out: list[ast.stmt] = []
    for t, v in zip(targets, parts, strict=True):
        assign = ast.copy_location(ast.Assign([ast.Name(t, ast.Store())], v), node)
        assign._hw_origin = origin_of(node)  # type: ignore[attr-defined]
        out.append(assign)
    return out


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
        self.depth = 0  # calls being inlined

    def run(self) -> Staged:
        forward = _unwrapped(type(self.root).forward)
        if forward is None:
            raise StagingError(f"{type(self.root).forward.__qualname__} is wrapped by a "
                               "decorator whose code hwaware cannot see through")
        func, filename = self.enter(forward, method=True)
        func.body = _keyword_only_as_locals(func, forward, filename) + func.body
        params = [a.arg for a in func.args.args[1:]]
        self.locals = set(params) | _assigned_names(func.body)
        defaults: list[ast.expr] = [d for d in func.args.defaults if isinstance(d, ast.Constant)]
        if len(defaults) != len(func.args.defaults):
            defaults = []  # a computed default: callers pass every argument
        return Staged(self.root, params, self.block(func.body), self.globals, filename,
                      defaults)

    def enter(self, fn: Any, method: bool) -> tuple[ast.FunctionDef, str]:
        """A fresh copy of `fn`'s parsed source (its receiver named `self` when it is called
        as a `method`), each statement knowing its origin, and the file it comes from."""
        func, filename = _method_ast(fn) if method else _function_ast(fn)
        func = copy.deepcopy(func)
        env = _environment(fn)
        self.globals[id(env)] = env
        _set_origin(func.body, filename, id(env))
        return func, filename

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
                or not n.args and not n.keywords and self.is_mode_query(n.func)
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

    def is_mode_query(self, func: ast.expr) -> bool:
        """`torch.jit.is_scripting` and the like: fixed for a model run in Python."""
        if not isinstance(func, ast.Attribute):
            return False
        ok, value = self.static_value(func)
        return ok and any(value is f for f in _mode_queries())

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
                return _simplify(super().generic_visit(node))

            def visit_ListComp(self, node: ast.ListComp) -> ast.AST:
                return stager.unroll_comprehension(self.generic_visit(node))

            def visit_Name(self, node: ast.Name) -> ast.AST:
                if isinstance(node.ctx, ast.Load) and node.id not in stager.locals:
                    node._hw_origin = origin_of(stmt)  # type: ignore[attr-defined]
                    ok, value = stager.static_value(node)
                    if ok and isinstance(value, (int, float, bool)) and node.id != "self":
                        return ast.copy_location(ast.Constant(value), node)
                return node

        return Folder().visit(expr)  # type: ignore[no-any-return]

    def unroll_comprehension(self, node: ast.AST) -> ast.AST:
        """`[g(x) for g in self.gates]` -> `[self.gates[0](x), self.gates[1](x), ...]`."""
        if not isinstance(node, ast.ListComp) or len(node.generators) != 1:
            return node
        gen = node.generators[0]
        items = None if gen.ifs or gen.is_async else self.static_items(gen.iter)
        if items is None or len(items) > MAX_UNROLL:
            return node
        elts = []
        for item in items:
            binding: dict[str, ast.expr] = {}
            if not _bind(gen.target, item, binding):
                return node
            elts.append(_Substitute(binding).visit(copy.deepcopy(node.elt)))
        return ast.copy_location(ast.List(elts, ast.Load()), node)

    # -------------------------------------------------------------- statements
    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        todo = list(stmts)
        while todo:
            stmt = todo.pop(0)
            alias = self.module_alias(stmt)
            if alias is not None:
                todo = _substitute_until_stored(todo, *alias)
            out.extend(self.statement(stmt))
            if out and isinstance(out[-1], (ast.Return, ast.Raise, ast.Break, ast.Continue)):
                break  # the rest is unreachable (e.g. after a branch decided at compile time)
        return out

    def module_alias(self, stmt: ast.stmt) -> tuple[str, ast.expr] | None:
        """`blk = self.blocks[2]` or `expert = self.experts[idx]`: a local naming a submodule.
        The statements after it use the submodule expression itself (so calls through the
        name are inlined or dispatched like direct ones); the assignment is marked, and split
        drops it when nothing reads the name any more."""
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and
                isinstance(stmt.targets[0], ast.Name)):
            return None
        value = self.fold(stmt.value, stmt)
        if isinstance(value, ast.Subscript) and self.dispatch_choices(value) is not None \
                and not isinstance(value.slice, ast.Name):
            return None  # `self.experts[t.argmax().item()]`: left to dispatch as a call
        ok, module = self.static_value(value)
        indexed = isinstance(value, ast.Subscript) and self.dispatch_choices(value) is not None
        if not (ok and isinstance(module, torch.nn.Module)) and not indexed:
            return None
        stmt._hw_alias = True  # type: ignore[attr-defined]
        return stmt.targets[0].id, value

    def statement(self, stmt: ast.stmt) -> list[ast.stmt]:
        if isinstance(stmt, ast.If):
            return self.if_(stmt)
        if isinstance(stmt, ast.While):
            return self.while_(stmt)
        if isinstance(stmt, ast.For):
            return self.for_(stmt)
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return)):
            return self.simple(stmt)
        if isinstance(stmt, ast.With) and all(
                i.optional_vars is None and _is_grad_mode(
                    i.context_expr, self.globals[origin_of(stmt).globals_id])
                for i in stmt.items):
            return self.block(stmt.body)  # `with torch.no_grad():`
        return [stmt]

    def if_(self, stmt: ast.If) -> list[ast.stmt]:
        stmt.test = self.fold(stmt.test, stmt)
        ok, value = self.static_value(stmt.test)
        if ok:
            return self.block(stmt.body if value else stmt.orelse)
        pre, stmt.test = self.split_test(stmt.test, stmt)
        stmt.body = self.block(stmt.body) or _fix([ast.Pass()], stmt)
        stmt.orelse = self.block(stmt.orelse)
        return self.block(pre) + [stmt]

    def while_(self, stmt: ast.While) -> list[ast.stmt]:
        stmt.test = self.fold(stmt.test, stmt)
        ok, value = self.static_value(stmt.test)
        if ok and not value:
            return self.block(stmt.orelse)
        pre, test = self.split_test(stmt.test, stmt)
        if pre:  # `while A and self.more(h):` -> `while True:` + the test, in steps, + break
            stop = ast.If(ast.UnaryOp(ast.Not(), test), [*stmt.orelse, ast.Break()], [])
            stmt.test, stmt.orelse = ast.Constant(True), []
            stmt.body = _fix([*pre, stop], stmt) + stmt.body
        stmt.body = self.block(stmt.body)
        stmt.orelse = self.block(stmt.orelse)
        return [stmt]

    def split_test(self, test: ast.expr, stmt: ast.stmt) -> tuple[list[ast.stmt], ast.expr]:
        """Statements computing a branch test first, and the test left: a call to inline
        (`if blk.decide(h):`) becomes `c = blk.decide(h); if c:`, and `A or B` whose `B` must
        not run when `A` decides (it calls code to inline, or reads a name `A` checks with
        `is None`) becomes `c = bool(A); if not c: c = bool(B)`."""
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            pre, inner = self.split_test(test.operand, stmt)
            return pre, ast.copy_location(ast.UnaryOp(ast.Not(), inner), test)
        inlined = [c for c in _calls_in_order(test) if self.inline_target_of(c)]
        if isinstance(test, ast.BoolOp) and (inlined or self.guarded(test)):
            cond = self.fresh("cond")
            pre = self.cond_assign(cond, test.values[0], stmt)
            for v in test.values[1:]:
                guard: ast.expr = ast.Name(cond, ast.Load())
                if isinstance(test.op, ast.Or):
                    guard = ast.UnaryOp(ast.Not(), guard)
                pre.append(ast.If(guard, self.cond_assign(cond, v, stmt), []))
            return _fix(pre, stmt), ast.Name(cond, ast.Load())
        if inlined:
            cond = self.fresh("cond")
            return _fix([ast.Assign([ast.Name(cond, ast.Store())], test)], stmt), \
                ast.Name(cond, ast.Load())
        return [], test

    def cond_assign(self, cond: str, value: ast.expr, stmt: ast.stmt) -> list[ast.stmt]:
        pre, value = self.split_test(value, stmt)
        truth = ast.Call(ast.Name("bool", ast.Load()), [value], [])
        return [*pre, ast.Assign([ast.Name(cond, ast.Store())], truth)]

    def guarded(self, test: ast.BoolOp) -> bool:
        """Does an operand read a name that an operand before it compares with `is`?"""
        checked: set[str] = set()
        for v in test.values:
            if _loaded_names(v) & checked:
                return True
            checked |= {n.left.id for n in ast.walk(v) if isinstance(n, ast.Compare)
                        and isinstance(n.left, ast.Name)
                        and all(isinstance(o, (ast.Is, ast.IsNot)) for o in n.ops)}
        return False

    def for_(self, stmt: ast.For) -> list[ast.stmt]:
        if getattr(stmt, "_hw_keep", False):
            stmt.body = self.block(stmt.body)
            return [stmt]
        stmt.iter = self.fold(stmt.iter, stmt)
        bindings = self.iteration_bindings(stmt)
        if bindings is None:
            stmt.body = self.block(stmt.body)
            stmt.orelse = self.block(stmt.orelse)
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
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id == "getattr" and var in _loaded_names(node):
                return True  # `getattr(self, f"head{i}")`
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
        source, broke = stmt.body, None
        if stmt.orelse and "break" in jumps:  # for ... else: a flag says whether it broke
            broke = self.fresh("broke")
            source = _ReplaceJumps(break_flag=broke).visit_list(stmt.body)
        copies: list[list[ast.stmt]] = []
        for binding in bindings:
            body = [_Substitute(binding).visit(copy.deepcopy(s)) for s in source]
            if "continue" in jumps:
                body = [_once_loop(_ReplaceJumps(continue_to_break=True).visit_list(body), stmt)]
            copies.append(body)
        flat = [s for body in copies for s in body]
        if "break" in jumps:
            flat = [_once_loop(flat, stmt)]
        if broke is not None:
            flat = [ast.Assign([ast.Name(broke, ast.Store())], ast.Constant(False)), *flat,
                    ast.If(ast.UnaryOp(ast.Not(), ast.Name(broke, ast.Load())), stmt.orelse, [])]
        else:
            flat += stmt.orelse
        return self.block(_fix(flat, stmt))

    # --------------------------------------------------------------- simple ones
    def simple(self, stmt: ast.stmt) -> list[ast.stmt]:
        value = getattr(stmt, "value", None)
        if isinstance(value, ast.expr):
            stmt.value = self.fold(value, stmt)  # type: ignore[attr-defined]
        choice = next((n for n in _evaluated(stmt) if isinstance(n, ast.IfExp)), None)
        if choice is not None:
            return self.select(stmt, choice)
        parts = _destructure(stmt)
        if parts is not None:
            return self.block(_fix(parts, stmt))
        dispatch = self.dynamic_index_call(stmt)
        if dispatch is not None:
            return dispatch
        return self.inline_calls(stmt)

    def select(self, stmt: ast.stmt, choice: ast.IfExp) -> list[ast.stmt]:
        """`y = f(a if c else b)` -> `if c: t = a` / `else: t = b`, then `y = f(t)`."""
        tmp = self.fresh("sel")
        branch = ast.If(choice.test, [ast.Assign([ast.Name(tmp, ast.Store())], choice.body)],
                        [ast.Assign([ast.Name(tmp, ast.Store())], choice.orelse)])
        replaced = _ReplaceNode(choice, ast.Name(tmp, ast.Load())).visit(stmt)
        return self.statement(_fix([branch], stmt)[0]) + self.statement(replaced)

    def dynamic_index_call(self, stmt: ast.stmt) -> list[ast.stmt] | None:
        """`y = self.experts[idx](x)` -> `if idx == 0: y = self.experts[0](x) elif ...`."""
        for node in ast.walk(stmt):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)):
                continue
            sub = node.func
            choices = self.dispatch_choices(sub)
            if choices is None:
                continue
            index = sub.slice
            pre: list[ast.stmt] = []
            if not isinstance(index, ast.Name):
                tmp = self.fresh("idx")
                pre = _fix([ast.Assign([ast.Name(tmp, ast.Store())], index)], stmt)
                index = ast.Name(tmp, ast.Load())
            chain: list[ast.stmt] = _fix([ast.Raise(ast.Call(
                ast.Name("IndexError", ast.Load()),
                [ast.Constant(f"{origin_of(stmt).where()}: no module {ast.unparse(sub.value)}"
                              f"[...] for that index; there are {choices}")], []), None)], stmt)
            for i in reversed(choices):
                sub.slice = ast.Constant(i)
                arm = copy.deepcopy(stmt)
                test = ast.Compare(copy.deepcopy(index), [ast.Eq()], [ast.Constant(i)])
                chain = _fix([ast.If(test, self.statement(arm), chain)], stmt)
            return pre + chain
        return None

    def dispatch_choices(self, sub: ast.Subscript) -> list[Any] | None:
        """The indices (keys) of a ModuleList (ModuleDict) indexed by a run-time value."""
        ok_c, container = self.static_value(sub.value)
        if not ok_c or self.static_value(sub.slice)[0]:
            return None
        if isinstance(container, torch.nn.ModuleDict):
            return list(container.keys())
        if isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)):
            return list(range(len(container)))
        return None

    def inline_target_of(self, call: ast.Call) -> tuple[Any, ast.expr | None] | None:
        """(function, expression of its `self` or None) when `call` is to be inlined."""
        ok, callee = self.static_value(call.func)
        target = inline_target(callee) if ok else None
        if target is None or not needs_inline(*target):
            return None
        if target[1] is None:
            return target[0], None
        if target[1] is callee:
            return target[0], call.func  # a submodule: `self.gate(h)`
        return (target[0], call.func.value) if isinstance(call.func, ast.Attribute) else None

    def inline_calls(self, stmt: ast.stmt) -> list[ast.stmt]:
        """Inline the first call whose code branches (see `needs_inline`). A call that cannot
        be inlined stays a call: its region runs it (in eager if it cannot be made static)."""
        for call in _calls_in_order(stmt):
            target = self.inline_target_of(call)
            if target is None:
                continue
            try:
                body, result = self.inline(stmt, call, *target)
            except StagingError as err:
                log.info("%s: call not inlined: %s", origin_of(stmt).where(), err)
                continue
            replaced = _ReplaceNode(call, result).visit(stmt)
            return body + self.statement(replaced)
        return [stmt]

    def inline(self, stmt: ast.stmt, call: ast.Call, fn: Any, self_expr: ast.expr | None
               ) -> tuple[list[ast.stmt], ast.expr]:
        """The staged body of `fn` called at `call`, and the expression standing for its value
        (a name, or a tuple of names for a function returning tuples)."""
        func, filename = _function_ast(fn)
        if not all(_is_grad_mode(d, _environment(fn)) or _is_static_method(d, _environment(fn))
                   for d in func.decorator_list) or \
                self.depth >= MAX_INLINE_DEPTH:
            raise StagingError(f"{filename}:{func.lineno}: {fn.__qualname__} is decorated or "
                               f"recursive beyond {MAX_INLINE_DEPTH} levels")
        func, _ = self.enter(fn, method=self_expr is not None)
        _plain_parameters(func, fn, filename)
        params = [a.arg for a in func.args.args[1 if self_expr is not None else 0:]]
        args = _bind_arguments(call, params, fn, origin_of(stmt).where())
        assigned = _assigned_names(func.body)
        fixed = {p: a for p, a in args.items() if p not in assigned and self.is_fixed(a)}
        prefix = f"_hw_{fn.__name__.strip('_').lower()}{next(self.counter)}_"
        rename = {n: prefix + n for n in (set(params) | assigned) - set(fixed)}
        self.locals |= set(rename.values())
        mapping = {**fixed, **({"self": self_expr} if self_expr is not None else {})}
        body = [_Substitute(mapping, rename).visit(s) for s in func.body]
        binds = _fix([ast.Assign([ast.Name(rename[p], ast.Store())], a)
                      for p, a in args.items() if p not in fixed], stmt)
        body, result = self.returns_to_assignments(body, stmt)
        self.depth += 1
        try:
            return self.block(binds + body), result
        finally:
            self.depth -= 1

    def is_fixed(self, arg: ast.expr) -> bool:
        """An argument substituted into the inlined body as is: a constant or a submodule."""
        ok, value = self.static_value(arg)
        return ok and (_is_constant(value) or isinstance(value, torch.nn.Module))

    def returns_to_assignments(self, body: list[ast.stmt], stmt: ast.stmt
                               ) -> tuple[list[ast.stmt], ast.expr]:
        """An inlined body with each `return` an assignment to the result name(s), and the
        expression standing for the call's value. An early return in an `if` makes the rest
        of the body that `if`'s other branch; returns inside loops (or in a branch that only
        sometimes returns) break out of a one-pass loop instead."""
        returns = [n for s in body for n in _walk_code(s) if isinstance(n, ast.Return)]
        width = _tuple_width(returns)
        results = [self.fresh("ret") for _ in range(width or 1)]
        result: ast.expr = ast.Tuple([ast.Name(r, ast.Load()) for r in results], ast.Load()) \
            if width else ast.Name(results[0], ast.Load())
        branched = _returns_as_branches(body, results, width is not None)
        if branched is not None:
            return _fix(branched, stmt), result
        flag = self.fresh("returned")
        replace = _ReplaceJumps(return_targets=results, unpack=width is not None, flag=flag)
        init = ast.Assign([ast.Name(flag, ast.Store())], ast.Constant(False))
        return _fix([init, _once_loop(replace.visit_list(body), stmt)], stmt), result


def _keyword_only_as_locals(func: ast.FunctionDef, fn: Any, filename: str
                            ) -> list[ast.stmt]:
    """A root forward's signature beyond plain parameters: keyword-only parameters with
    constant defaults become locals set to them (the compiled model is called positionally),
    and a `*args` its code never reads is dropped. The assignments to put first in the body;
    StagingError for anything else, `**kwargs` included: that is the Hugging Face convention,
    whose forwards branch on flag parameters (`return_dict`, `output_hidden_states`,
    `labels is None`) that the static path specializes at the call's values, while a host
    program would split the model at every such branch (each layer of a loop testing
    `output_hidden_states` its own region)."""
    a = func.args
    where = f"{filename}:{func.lineno}: {fn.__qualname__}"
    if a.kwarg is not None:
        raise StagingError(f"{where} takes **{a.kwarg.arg}: left to the static path")
    if a.vararg is not None and a.vararg.arg in _loaded_names(ast.Module(func.body, [])):
        raise StagingError(f"{where} reads its arguments through *{a.vararg.arg}: "
                           "not supported")
    out: list[ast.stmt] = []
    for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        if not isinstance(default, ast.Constant):
            raise StagingError(f"{where}: keyword-only parameter `{arg.arg}` without a "
                               "constant default is not supported")
        out.append(ast.Assign([ast.Name(arg.arg, ast.Store())], default))
    a.vararg, a.kwarg, a.kwonlyargs, a.kw_defaults = None, None, [], []
    return _fix(out, func.body[0])


def _returns_as_branches(stmts: list[ast.stmt], targets: list[str], unpack: bool
                         ) -> list[ast.stmt] | None:
    """`if c: return a` + rest -> `if c: t = a` / `else: rest` (rest's returns likewise);
    None when a return sits in a loop or in a branch that does not always leave."""
    out: list[ast.stmt] = []
    for i, s in enumerate(stmts):
        if isinstance(s, ast.Return):
            return out + _return_assigns(s, targets, unpack)
        if not any(isinstance(n, ast.Return) for n in _walk_code(s)):
            out.append(s)
            continue
        if not isinstance(s, ast.If):
            return None
        rest = stmts[i + 1:]
        if _always_leaves(s.body):
            body, orelse = s.body, s.orelse + rest
        elif _always_leaves(s.orelse):
            body, orelse = s.body + rest, s.orelse
        else:
            return None
        new_body = _returns_as_branches(body, targets, unpack)
        new_orelse = _returns_as_branches(orelse, targets, unpack)
        if new_body is None or new_orelse is None:
            return None
        s.body, s.orelse = new_body or [ast.Pass()], new_orelse
        return out + [s]
    none = ast.Constant(None)  # falling off the end returns None
    return out + [ast.Assign([ast.Name(t, ast.Store())], none) for t in targets]


def _always_leaves(stmts: list[ast.stmt]) -> bool:
    """Does every path through `stmts` end in `return` or `raise`?"""
    last = stmts[-1] if stmts else None
    return isinstance(last, (ast.Return, ast.Raise)) or isinstance(last, ast.If) and \
        _always_leaves(last.body) and _always_leaves(last.orelse)


def _walk_code(node: ast.AST) -> Iterator[ast.AST]:
    """`ast.walk` that does not enter nested functions, lambdas or classes."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                  ast.ClassDef)):
            yield from _walk_code(child)


def _calls_in_order(node: ast.AST) -> Iterator[ast.Call]:
    return (n for n in _evaluated(node) if isinstance(n, ast.Call))


def _destructure(stmt: ast.stmt) -> list[ast.stmt] | None:
    """`a, b = x, y` as `a = x; b = y` when no value reads a name assigned here."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
        return None
    target, value = stmt.targets[0], stmt.value
    if not (isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List))
            and len(target.elts) == len(value.elts)
            and all(isinstance(t, ast.Name) for t in target.elts)
            and not any(isinstance(v, ast.Starred) for v in value.elts)):
        return None
    names = {t.id for t in target.elts if isinstance(t, ast.Name)}
    if _loaded_names(value) & names or len(names) < len(target.elts):
        return None
    return [ast.copy_location(ast.Assign([t], v), stmt)
            for t, v in zip(target.elts, value.elts, strict=True)]


def _substitute_until_stored(stmts: list[ast.stmt], name: str, expr: ast.expr
                             ) -> list[ast.stmt]:
    """`name` -> `expr` in `stmts`, up to the first statement that assigns `name` or a name
    `expr` reads."""
    stop = {name} | _loaded_names(expr)
    out: list[ast.stmt] = []
    for i, s in enumerate(stmts):
        if _assigned_names([s]) & stop:
            return out + stmts[i:]
        out.append(_Substitute({name: expr}).visit(s))
    return out


def _evaluated(node: ast.AST) -> Iterator[ast.AST]:
    """Sub-nodes that run whenever `node` runs, outer ones first (not those in a lambda, a
    comprehension, an `a if c else b` arm or a short-circuited operand)."""
    todo: list[ast.AST] = [node]
    while todo:
        node = todo.pop(0)
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                                  ast.GeneratorExp, ast.FunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.IfExp) and child is not node.test or \
                    isinstance(node, ast.BoolOp) and child is not node.values[0]:
                continue
            todo.append(child)


def _bind_arguments(call: ast.Call, params: list[str], fn: Any, where: str
                    ) -> dict[str, ast.expr]:
    """Parameter -> argument expression of an inlined call (defaults as constants)."""
    if len(call.args) > len(params) or any(isinstance(a, ast.Starred) for a in call.args) \
            or any(k.arg is None or k.arg not in params for k in call.keywords):
        raise StagingError(f"{where}: the arguments of {fn.__qualname__} do not match "
                           f"its parameters ({', '.join(params)})")
    args = dict(zip(params, call.args, strict=False))
    args.update({k.arg: k.value for k in call.keywords if k.arg is not None})
    defaults = dict(zip(params[len(params) - len(fn.__defaults__ or ()):],
                        fn.__defaults__ or (), strict=True))
    for p in params:
        if p not in args:
            if p not in defaults or not _is_constant(defaults[p]):
                raise StagingError(f"{where}: {fn.__qualname__} needs argument `{p}`")
            args[p] = ast.Constant(defaults[p])
    return {p: args[p] for p in params}


def _simplify(node: ast.AST) -> ast.AST:
    """Drop what constants decide: leading constants of `and`/`or`, `a if True else b`, and an
    element picked from a tuple of names (`(out, steps)[0]`, what inlining leaves)."""
    if isinstance(node, ast.BoolOp):
        values = list(node.values)
        while len(values) > 1 and isinstance(values[0], ast.Constant):
            if bool(values[0].value) == isinstance(node.op, ast.Or):
                return values[0]  # decides the whole expression (its value, too)
            values.pop(0)
        return values[0] if len(values) == 1 else ast.copy_location(ast.BoolOp(node.op, values),
                                                                     node)
    if isinstance(node, ast.IfExp) and isinstance(node.test, ast.Constant):
        return node.body if node.test.value else node.orelse
    if isinstance(node, ast.Subscript) and isinstance(node.value, (ast.Tuple, ast.List)) and \
            isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int) and \
            all(isinstance(e, (ast.Name, ast.Constant)) for e in node.value.elts) and \
            -len(node.value.elts) <= node.slice.value < len(node.value.elts):
        return node.value.elts[node.slice.value]
    return node


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
