"""Dynamic networks, step 2 (split): the staged forward -> a host program + static regions.

Every statement of the staged forward is either
- host: control flow (`if`, `while`, counted `for`, `return`, `break`, `raise`), assignments
  of Python scalars (`steps += 1`, `idx = t.item()`, `n = x.shape[1]`, `b, n, d = x.shape`),
  and the Python containers the forward builds (`outs = []`, `outs.append(h)`,
  `return {"logits": logits, "steps": steps}`: the host holds the tensors in them). These stay
  in the generated host program, readable Python that is saved with the model;
- tensor: everything else. Consecutive tensor statements form a region, a function
  `region_k(self, <live-in>) -> (<live-out>)` that is captured and compiled as one static graph.
Tensor work inside host expressions (`if probs.max() > 0.9:`, `logits.argmax(-1).item()`,
`scores.tolist()`, the elements of a container) is hoisted into the region before it, so the
host only reads a value that is ready. Statements with
Python side effects (`print`, `list.append`, `self.x = ...`) get a region of their own that
runs in eager PyTorch.
"""

from __future__ import annotations

import ast
import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from hwaware.dynamic.stage import VALUE_READS, Origin, Staged, StagingError, origin_of

HOST_BUILTINS = {"int", "float", "bool", "len", "min", "max", "abs", "round", "range",
                 "enumerate", "zip", "reversed", "sorted", "sum", "any", "all",
                 "IndexError", "ValueError", "RuntimeError", "AssertionError", "True", "False",
                 "None", "math", "print", "isinstance", "tuple", "list"}
CONVERSIONS = {"int", "float", "bool"}
HOST_ITERATION = {"min", "max", "abs", "round", "range", "enumerate", "zip", "reversed",
                  "sorted", "sum", "any", "all", "list", "tuple"}  # host values in, host out
SHAPE_METHODS = {"size", "dim", "numel"}
SIDE_EFFECT_CALLS = {"print", "input", "open", "breakpoint", "exec", "eval"}
SIDE_EFFECT_METHODS = {"append", "extend", "insert", "pop", "remove", "clear", "setdefault",
                       "write", "update"}
DISPLAYS = (ast.List, ast.Tuple, ast.Dict)
Slot = tuple[Any, int | str]  # where an operand sits: (list, index) or (node, field name)


@dataclass
class RegionDef:
    """One straight-line region: its statements and calling convention."""

    name: str
    statements: list[ast.stmt]
    origin: Origin
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    eager_reason: str | None = None  # set when the region must run in eager PyTorch
    arithmetic_inputs: list[str] = field(default_factory=list)  # scalars passed as 0-d tensors

    @property
    def where(self) -> str:
        return self.origin.where()

    def source(self) -> str:
        ret = ast.Return(ast.Tuple([ast.Name(n, ast.Load()) for n in self.outputs], ast.Load()))
        args = ast.arguments(posonlyargs=[], args=[ast.arg("self")] + [ast.arg(n)
                                                                      for n in self.inputs],
                             kwonlyargs=[], kw_defaults=[], defaults=[])
        func = ast.FunctionDef(name=self.name, args=args, decorator_list=[],
                               body=[*copy.deepcopy(self.statements), ret])
        return ast.unparse(ast.fix_missing_locations(ast.Module([func], [])))


@dataclass
class HostPlan:
    """The host program (an AST calling regions by name) and its regions."""

    params: list[str]
    body: list[ast.stmt]
    regions: dict[str, RegionDef]
    sites: int
    defaults: list[ast.expr] = field(default_factory=list)

    @property
    def is_dynamic(self) -> bool:
        """Does the forward need the host program: decisions, loops, values read into Python
        (`.item()`, `int(t)`) or eager regions? (Regions cut only by host containers or names
        are one static graph: the static path captures the whole forward.)"""
        return self.sites > 0 or any(r.eager_reason for r in self.regions.values()) or any(
            isinstance(s, (ast.For, ast.While, ast.If)) for s in self.body) or any(
            isinstance(n, ast.Call) and (isinstance(n.func, ast.Attribute) and n.func.attr in
                                         VALUE_READS or isinstance(n.func, ast.Name) and
                                         n.func.id in CONVERSIONS)
            for s in self.body for n in ast.walk(s))

    def source(self, instrumented: bool = False) -> str:
        """The host program as Python; `instrumented` routes each decision through
        `_hw_decide(site, value)` (used to explore every branch at compile time)."""
        body = copy.deepcopy(self.body)
        if instrumented:
            body = [_Instrument().visit(s) for s in body]
        args = ast.arguments(posonlyargs=[], args=[ast.arg(p) for p in self.params],
                             kwonlyargs=[], kw_defaults=[], defaults=self.defaults)
        func = ast.FunctionDef(name="forward", args=args, body=body or [ast.Pass()],
                               decorator_list=[])
        return ast.unparse(ast.fix_missing_locations(ast.Module([func], [])))


def split(staged: Staged) -> HostPlan:
    """Cut the staged forward into host statements and regions (see the module docstring)."""
    return _Splitter(staged).run()


# -------------------------------------------------------------------- host values
def is_host_expr(e: ast.expr, host: set[str]) -> bool:
    """Is `e` a Python scalar the host can compute (given which names hold host scalars)?"""
    if isinstance(e, ast.Constant):
        return True
    if isinstance(e, ast.Name):
        return e.id in host or e.id in {"True", "False", "None"}
    if isinstance(e, (ast.Tuple, ast.List)):
        return all(is_host_expr(x, host) for x in e.elts)
    if isinstance(e, ast.Compare) and all(isinstance(o, (ast.Is, ast.IsNot)) for o in e.ops):
        return True  # `x is None`: a property of the Python object, known to the host as is
    if isinstance(e, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp)):
        return all(is_host_expr(x, host) for x in ast.iter_child_nodes(e)
                   if isinstance(x, ast.expr))
    if isinstance(e, ast.Attribute):
        return e.attr in {"shape", "ndim"}
    if isinstance(e, ast.Subscript):
        return is_host_expr(e.value, host) and is_host_expr(e.slice, host)
    if isinstance(e, ast.Slice):
        return all(x is None or is_host_expr(x, host) for x in (e.lower, e.upper, e.step))
    if isinstance(e, ast.Call):
        return _is_host_call(e, host)
    return False


def _is_host_call(e: ast.Call, host: set[str]) -> bool:
    f = e.func
    if isinstance(f, ast.Name):
        if f.id in CONVERSIONS and len(e.args) == 1 or f.id in ("len", "isinstance"):
            return True  # isinstance: a property of the Python object, known to the host
        return f.id in HOST_ITERATION and all(is_host_expr(a, host) for a in e.args)
    if isinstance(f, ast.Attribute):
        if f.attr in VALUE_READS and not e.args:
            return True
        if f.attr in SHAPE_METHODS or isinstance(f.value, ast.Name) and f.value.id == "math":
            return all(is_host_expr(a, host) for a in e.args)
    return False


def _container_names(body: list[ast.stmt], params: list[str]) -> set[str]:
    """Names only ever bound to a list, tuple or dict display (`outs = []`): containers the
    host builds and fills (`outs.append(h)`), whatever their elements are."""
    ok: dict[str, bool] = {}
    for node in ast.walk(ast.Module(body, [])):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            ok.setdefault(node.id, False)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            ok[name] = ok.get(name, True) and isinstance(node.value, DISPLAYS)
    return {n for n, good in ok.items() if good} - set(params)


def _host_names(body: list[ast.stmt], params: list[str], containers: set[str]) -> set[str]:
    """Names that only ever hold host scalars (greatest fixpoint over all assignments); not
    the containers, whose elements may be tensors."""
    assigns: list[tuple[ast.expr, ast.expr | None]] = []
    for node in ast.walk(ast.Module(body, [])):
        if isinstance(node, ast.Assign):
            assigns.extend((t, node.value) for t in node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            assigns.append((node.target, node.value))
        elif isinstance(node, ast.For):
            assigns.append((node.target, node.iter))
    host = {n.id for t, _ in assigns for n in ast.walk(t) if isinstance(n, ast.Name)}
    host -= set(params) | containers
    changed = True
    while changed:
        changed = False
        for target, value in assigns:
            names = {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
            ok = value is not None and is_host_expr(value, host) and _names_target(target)
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and \
                    value.func.id == "range":
                ok = True
            if not ok and names & host:
                host -= names
                changed = True
    return host


def _names_target(target: ast.expr) -> bool:
    """A name, or a tuple of names (`b, n, d = x.shape`)."""
    return isinstance(target, ast.Name) or isinstance(target, (ast.Tuple, ast.List)) and \
        all(isinstance(t, ast.Name) for t in target.elts)


def _side_effect(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, (ast.Global, ast.Nonlocal)):
        return "global/nonlocal statement"
    targets = stmt.targets if isinstance(stmt, ast.Assign) else \
        [stmt.target] if isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) else []
    for t in targets:
        if isinstance(t, ast.Attribute):
            return f"assignment to attribute `{ast.unparse(t)}`"
    for node in ast.walk(stmt):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in SIDE_EFFECT_CALLS:
                return f"call to `{f.id}`"
            if isinstance(f, ast.Attribute) and f.attr in SIDE_EFFECT_METHODS:
                return f"call to `.{f.attr}()`"
    return None


# ------------------------------------------------------------------------ splitter
@dataclass
class _Tensor:
    """A statement that belongs in a region."""

    stmt: ast.stmt
    eager_reason: str | None = None


class _Splitter:
    def __init__(self, staged: Staged):
        self.staged = staged
        self.containers = _container_names(staged.body, staged.params)
        self.host = _host_names(staged.body, staged.params, self.containers)
        self.read = {n.id for n in ast.walk(ast.Module(staged.body, []))
                     if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        self.counter = itertools.count()
        self.regions: dict[str, RegionDef] = {}
        self.calls: dict[str, ast.stmt] = {}
        self.region_of_call: dict[int, RegionDef] = {}
        self.sites = itertools.count()

    def run(self) -> HostPlan:
        body = self.lower(self.staged.body)
        self.number_in_program_order(body)
        self.connect(body)
        self.check_host_names(body)
        sites = sum(1 for n in ast.walk(ast.Module(body, [])) if hasattr(n, "_hw_site"))
        return HostPlan(self.staged.params, body, self.regions, sites, self.staged.defaults)

    def temp(self, stem: str) -> str:
        return f"_hw_{stem}{next(self.counter)}"

    # ------------------------------------------------------------------ lowering
    def lower(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        items: list[ast.stmt | _Tensor] = []
        for s in stmts:
            items.extend(self.lower_stmt(s))
        return self.group(self.hoist_independent(items))

    def hoist_independent(self, items: list[ast.stmt | _Tensor]) -> list[ast.stmt | _Tensor]:
        """Move tensor statements up past host `if`s and assignments they do not depend on,
        into the region before them: one subgraph call instead of two (BlockDrop's
        `mask[0, i] > 0.5` joins the policy's region). Never past a statement that can leave
        the block (return/break/continue/raise), so early exits still skip the work after
        them."""
        out: list[ast.stmt | _Tensor] = []
        for item in items:
            if isinstance(item, _Tensor) and item.eager_reason is None:
                at = len(out)
                while at > 0 and not isinstance(out[at - 1], _Tensor) and \
                        self.independent(item, out[at - 1]):  # type: ignore[arg-type]
                    at -= 1
                if 0 < at < len(out) and isinstance(out[at - 1], _Tensor):
                    out.insert(at, item)
                    continue
            out.append(item)
        return out

    def independent(self, item: _Tensor, host: ast.stmt) -> bool:
        if not isinstance(host, (ast.If, ast.Assign, ast.AugAssign, ast.Expr)):
            return False
        nodes = list(ast.walk(host))
        if any(isinstance(n, (ast.Return, ast.Break, ast.Continue, ast.Raise)) for n in nodes):
            return False
        written = _mutated_containers(host)
        read: set[str] = set()
        for n in nodes:
            region = self.region_of_call.get(id(n))
            body = region.statements if region is not None else []
            for m in [n, *(x for st in body for x in ast.walk(st))]:
                if isinstance(m, ast.Name):
                    (read if isinstance(m.ctx, ast.Load) else written).add(m.id)
        mine_read = {n.id for n in ast.walk(item.stmt) if isinstance(n, ast.Name)
                     and isinstance(n.ctx, ast.Load)}
        mine_written = {n.id for n in ast.walk(item.stmt) if isinstance(n, ast.Name)
                        and not isinstance(n.ctx, ast.Load)}
        return not (mine_read & written) and not (mine_written & (read | written))

    def lower_stmt(self, s: ast.stmt) -> list[ast.stmt | _Tensor]:
        if isinstance(s, ast.If):
            pre, s.test = self.host_test(s.test, s)
            s.body = self.lower(s.body) or [ast.Pass()]
            s.orelse = self.lower(s.orelse)
            s._hw_site = next(self.sites)  # type: ignore[attr-defined]
            return [*pre, s]
        if isinstance(s, ast.While):
            return self.lower_while(s)
        if isinstance(s, ast.For) and (getattr(s, "_hw_keep", False) or  # over host values
                                       is_host_expr(s.iter, self.host | self.containers)):
            pre, s.iter = self.hoist(s.iter, s)  # `for v in scores.tolist():`
            s.body = self.lower(s.body) or [ast.Pass()]
            s.orelse = self.lower(s.orelse)
            return [*pre, s]
        if getattr(s, "_hw_alias", False) and not _assigned_names_read(s, self.read):
            return []  # `blk = self.blocks[2]`, every use replaced by the submodule (stage)
        if isinstance(s, ast.Return):
            return self.lower_return(s)
        if isinstance(s, ast.Assign) and len(s.targets) == 1 and \
                isinstance(s.targets[0], ast.Name) and isinstance(s.value, ast.Name):
            return [s]  # `h = x` only names a value: no work for a region
        if isinstance(s, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and self.is_host_assign(s):
            pre, s.value = self.hoist(s.value, s)  # type: ignore[arg-type]
            return [*pre, s]
        operands = self.container_operands(s)
        if operands is not None:
            return [*self.ready(operands, s), s]
        if isinstance(s, ast.Assert):
            pre, s.test = self.host_test(s.test, s)
            return [*pre, s]
        if isinstance(s, (ast.Break, ast.Continue, ast.Pass, ast.Raise)):
            return [s]
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
            return []  # a docstring or a bare constant
        return [_Tensor(s, _side_effect(s))]

    def lower_while(self, s: ast.While) -> list[ast.stmt | _Tensor]:
        pre, test = self.host_test(s.test, s)
        body = s.body
        if pre:  # tensor work in the test: re-run it before each check, inside the loop
            check = ast.copy_location(ast.If(ast.UnaryOp(ast.Not(), test),
                                             [*self.lower(s.orelse), ast.Break()], []), s)
            check._hw_site = next(self.sites)  # type: ignore[attr-defined]
            lowered_body = self.lower(body)
            s.test, s.orelse = ast.Constant(True), []
            s.body = self.group([*pre, check, *lowered_body])
            return [s]
        s.test = test
        s.body = self.lower(body) or [ast.Pass()]
        s.orelse = self.lower(s.orelse)
        s._hw_site = next(self.sites)  # type: ignore[attr-defined]
        return [s]

    def lower_return(self, s: ast.Return) -> list[ast.stmt | _Tensor]:
        v = s.value
        if v is None or _names_only(v) or is_host_expr(v, self.host):
            if v is not None:
                pre, s.value = self.hoist(v, s)
                return [*pre, s]
            return [s]
        if isinstance(v, DISPLAYS):  # `return logits, steps`: the host builds the tuple
            return [*self.ready(_display_slots(v), s), s]
        tmp = self.temp("out")
        assign = ast.copy_location(ast.Assign([ast.Name(tmp, ast.Store())], v), s)
        assign._hw_origin = origin_of(s)  # type: ignore[attr-defined]
        s.value = ast.Name(tmp, ast.Load())
        return [_Tensor(assign), s]

    def is_host_assign(self, s: ast.Assign | ast.AugAssign | ast.AnnAssign) -> bool:
        targets = s.targets if isinstance(s, ast.Assign) else [s.target]
        if not all(_names_target(t) and all(n.id in self.host for n in ast.walk(t)
                                            if isinstance(n, ast.Name)) for t in targets):
            return False
        return s.value is not None and is_host_expr(s.value, self.host)

    def container_operands(self, s: ast.stmt) -> list[Slot] | None:
        """The operand slots of a statement that builds or fills a host container
        (`outs = [a, b]`, `outs.append(h)`, `d["k"] = v`, `return a, b`), or None."""
        if isinstance(s, ast.Assign) and len(s.targets) == 1:
            t = s.targets[0]
            if isinstance(t, ast.Name) and t.id in self.containers and \
                    isinstance(s.value, DISPLAYS):
                return _display_slots(s.value)
            if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and \
                    t.value.id in self.containers:
                return [(s, "value"), (t, "slice")]
        call = s.value if isinstance(s, ast.Expr) else None
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and \
                isinstance(call.func.value, ast.Name) and call.func.value.id in \
                self.containers and call.func.attr in SIDE_EFFECT_METHODS and not call.keywords:
            return [(call.args, i) for i in range(len(call.args))]
        return None

    def ready(self, slots: list[Slot], s: ast.stmt) -> list[ast.stmt | _Tensor]:
        """Make each operand slot a name or a host value: tensor work moves to a region."""
        pre: list[ast.stmt | _Tensor] = []
        for owner, key in slots:
            e = owner[key] if isinstance(key, int) else getattr(owner, key)
            if e is None or isinstance(e, (ast.Name, ast.Constant)):
                continue
            p, new = self.hoist(e, s) if is_host_expr(e, self.host) else \
                self.to_temp(e, s, "v")
            pre += p
            if isinstance(key, int):
                owner[key] = new
            else:
                setattr(owner, key, new)
        return pre

    # ------------------------------------------------------------------- hoisting
    def host_test(self, test: ast.expr, s: ast.stmt) -> tuple[list[ast.stmt | _Tensor],
                                                               ast.expr]:
        """A branch condition the host can evaluate, and the tensor work it needs first."""
        if is_host_expr(test, self.host):
            return self.hoist(test, s)
        if isinstance(test, ast.BoolOp):
            pre: list[ast.stmt | _Tensor] = []
            values = []
            for v in test.values:
                p, nv = self.host_test(v, s)
                pre += p
                values.append(nv)
            return pre, ast.BoolOp(test.op, values)
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            pre, operand = self.host_test(test.operand, s)
            return pre, ast.UnaryOp(ast.Not(), operand)
        if isinstance(test, ast.Name):
            return [], test
        return self.to_temp(test, s, "cond")

    def to_temp(self, value: ast.expr, s: ast.stmt, stem: str
                ) -> tuple[list[ast.stmt | _Tensor], ast.expr]:
        tmp = self.temp(stem)
        assign = ast.copy_location(ast.Assign([ast.Name(tmp, ast.Store())], value), s)
        assign._hw_origin = origin_of(s)  # type: ignore[attr-defined]
        return [_Tensor(assign)], ast.Name(tmp, ast.Load())

    def hoist(self, e: ast.expr, s: ast.stmt) -> tuple[list[ast.stmt | _Tensor], ast.expr]:
        """Move tensor computations feeding host conversions (`.item()`, `int()`, `.shape`)
        into a region, leaving the conversion on a name."""
        pre: list[ast.stmt | _Tensor] = []
        splitter = self

        class Hoister(ast.NodeTransformer):
            def operand(self, node: ast.expr) -> ast.expr:
                if isinstance(node, ast.Name) or is_host_expr(node, splitter.host):
                    return self.visit(node)  # type: ignore[no-any-return]
                p, name = splitter.to_temp(node, s, "v")
                pre.extend(p)
                return name

            def visit_Call(self, node: ast.Call) -> ast.AST:
                f = node.func
                if isinstance(f, ast.Name) and (f.id in CONVERSIONS or f.id == "len") \
                        and node.args:
                    node.args[0] = self.operand(node.args[0])
                    return node
                if isinstance(f, ast.Attribute) and f.attr in VALUE_READS | SHAPE_METHODS:
                    f.value = self.operand(f.value)
                    node.args = [self.visit(a) for a in node.args]
                    return node
                return self.generic_visit(node)

            def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
                if node.attr in {"shape", "ndim"}:
                    node.value = self.operand(node.value)
                    return node
                return self.generic_visit(node)

        return pre, Hoister().visit(e)

    # ------------------------------------------------------------------- regions
    def group(self, items: list[ast.stmt | _Tensor]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        run: list[_Tensor] = []
        for item in items + [None]:  # type: ignore[list-item]
            if isinstance(item, _Tensor) and run and self.same_region(run, item):
                run.append(item)
                continue
            if run:
                out.append(self.make_region(run))
                run = []
            if isinstance(item, _Tensor):
                run = [item]
            elif item is not None:
                out.append(item)
        return out

    @staticmethod
    def same_region(run: list[_Tensor], item: _Tensor) -> bool:
        last = run[-1]
        return last.eager_reason is None and item.eager_reason is None and \
            origin_of(last.stmt).globals_id == origin_of(item.stmt).globals_id

    def make_region(self, run: list[_Tensor]) -> ast.stmt:
        name = f"region_{len(self.regions)}"
        stmts = [t.stmt for t in run]
        self.regions[name] = RegionDef(name, stmts, origin_of(stmts[0]),
                                       eager_reason=run[0].eager_reason)
        call = ast.Expr(ast.Call(ast.Name(name, ast.Load()), [], []))
        self.calls[name] = call
        self.region_of_call[id(call)] = self.regions[name]
        return call

    def number_in_program_order(self, body: list[ast.stmt]) -> None:
        order = [n for n in _statements_in_order(body) if any(
            n is c for c in self.calls.values())]
        by_call = {id(c): name for name, c in self.calls.items()}
        regions, calls = {}, {}
        for i, stmt in enumerate(order):
            old = by_call[id(stmt)]
            new = f"region_{i}"
            regions[new] = self.regions[old]
            regions[new].name = new
            calls[new] = stmt
        self.regions, self.calls = regions, calls

    def connect(self, body: list[ast.stmt]) -> None:
        """Fill in each region's live-in and live-out names, and its call in the host."""
        local = set(self.staged.params) | {
            n.id for r in self.regions.values() for s in r.statements for n in ast.walk(s)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        } | {n.id for n in ast.walk(ast.Module(body, []))
             if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for r in self.regions.values():
            r.inputs = _live_in(r.statements, local)
        host_loads = {n.id for n in ast.walk(ast.Module(body, []))
                      if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        needed = host_loads | {i for r in self.regions.values() for i in r.inputs}
        replacements: dict[int, ast.stmt] = {}
        for name, r in self.regions.items():
            stored: list[str] = []
            for s in r.statements:
                for out in _free_names(s, ast.Store):
                    if out in needed and out not in stored:
                        stored.append(out)
            r.outputs = stored
            r.arithmetic_inputs = [i for i in r.inputs if i in self.host and
                                   _only_arithmetic(r.statements, i)]
            call = ast.Call(ast.Name(name, ast.Load()),
                            [ast.Name(i, ast.Load()) for i in r.inputs], [])
            if r.outputs:
                target = ast.Tuple([ast.Name(o, ast.Store()) for o in r.outputs], ast.Store())
                new: ast.stmt = ast.Assign([target], call)
            else:
                new = ast.Expr(call)
            replacements[id(self.calls[name])] = new
        _replace_statements(body, replacements)

    def check_host_names(self, body: list[ast.stmt]) -> None:
        known = set(self.staged.params) | set(self.regions) | HOST_BUILTINS | {
            n.id for n in ast.walk(ast.Module(body, []))
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for n in ast.walk(ast.Module(body, [])):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in known:
                raise StagingError(f"the host program would need `{n.id}`, which is neither "
                                   "a local value nor a constant")


def _statements_in_order(body: list[ast.stmt]) -> list[ast.stmt]:
    out: list[ast.stmt] = []
    for s in body:
        out.append(s)
        for fld in ("body", "orelse"):
            inner = getattr(s, fld, None)
            if isinstance(inner, list):
                out.extend(_statements_in_order(inner))
    return out


def _replace_statements(body: list[ast.stmt], new: dict[int, ast.stmt]) -> None:
    for i, s in enumerate(body):
        if id(s) in new:
            body[i] = new[id(s)]
            continue
        for fld in ("body", "orelse"):
            inner = getattr(s, fld, None)
            if isinstance(inner, list):
                _replace_statements(inner, new)


def _mutated_containers(s: ast.stmt) -> set[str]:
    """Names a statement changes in place: `outs.append(h)`, `d["k"] = v`."""
    out: set[str] = set()
    for n in ast.walk(s):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and \
                isinstance(n.func.value, ast.Name) and n.func.attr in SIDE_EFFECT_METHODS:
            out.add(n.func.value.id)
        if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) and \
                isinstance(n.value, ast.Name):
            out.add(n.value.id)
    return out


def _assigned_names_read(s: ast.stmt, read: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and n.id in read
               for n in ast.walk(s))


def _display_slots(v: ast.expr) -> list[Slot]:
    """The element (and key) slots of a list, tuple or dict display."""
    if isinstance(v, ast.Dict):
        return [(v.keys, i) for i in range(len(v.keys))] + \
            [(v.values, i) for i in range(len(v.values))]
    assert isinstance(v, (ast.List, ast.Tuple))
    return [(v.elts, i) for i in range(len(v.elts))]


def _names_only(v: ast.expr) -> bool:
    if isinstance(v, ast.Name):
        return True
    return isinstance(v, (ast.Tuple, ast.List)) and all(
        isinstance(e, (ast.Name, ast.Constant)) for e in v.elts)


def _live_in(stmts: list[ast.stmt], local: set[str]) -> list[str]:
    assigned: set[str] = set()
    inputs: list[str] = []
    for s in stmts:
        loads = _free_names(s, ast.Load)
        if isinstance(s, ast.For):  # a loop in a region binds its variables itself
            bound = set(_free_names(s.target, ast.Store)) - set(_free_names(s.iter, ast.Load))
            loads = [n for n in loads if n not in bound]
        if isinstance(s, ast.AugAssign) and isinstance(s.target, ast.Name):
            loads.append(s.target.id)
        for name in loads:
            if name in local and name not in assigned and name not in inputs:
                inputs.append(name)
        assigned |= set(_free_names(s, ast.Store))
    return inputs


COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _free_names(node: ast.AST, ctx: type, bound: frozenset[str] = frozenset()) -> list[str]:
    """Names `node` loads (ctx=ast.Load) or stores (ast.Store) in the function's own scope:
    not the variables a comprehension binds for itself (`o` in `sum(o.norm() for o in outs)`)."""
    if isinstance(node, ast.Name):
        return [node.id] if isinstance(node.ctx, ctx) and node.id not in bound else []
    if isinstance(node, COMPREHENSIONS):
        bound = bound | {n.id for g in node.generators for n in ast.walk(g.target)
                         if isinstance(n, ast.Name)}
    return [x for child in ast.iter_child_nodes(node) for x in _free_names(child, ctx, bound)]


def _only_arithmetic(stmts: list[ast.stmt], name: str) -> bool:
    """Is every use of `name` an operand of arithmetic (so a 0-d tensor can stand in for it)?"""
    parents: dict[int, ast.AST] = {}
    for s in stmts:
        for node in ast.walk(s):
            for child in ast.iter_child_nodes(node):
                parents[id(child)] = node
    for s in stmts:
        for node in ast.walk(s):
            if isinstance(node, ast.Name) and node.id == name:
                parent = parents.get(id(node))
                if not isinstance(parent, (ast.BinOp, ast.UnaryOp)):
                    return False
    return True


class _Instrument(ast.NodeTransformer):
    def visit_If(self, node: ast.If) -> ast.AST:
        self.generic_visit(node)
        return self._wrap(node)

    def visit_While(self, node: ast.While) -> ast.AST:
        self.generic_visit(node)
        return self._wrap(node)

    @staticmethod
    def _wrap(node: ast.If | ast.While) -> ast.AST:
        site = getattr(node, "_hw_site", None)
        if site is not None:
            node.test = ast.Call(ast.Name("_hw_decide", ast.Load()),
                                 [ast.Constant(site), node.test], [])
        return node
