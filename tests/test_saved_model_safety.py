"""Saved models as untrusted artifacts: the manifest, the op allowlist, the declarative host
program, and no unsafe deserialisation anywhere in the package.

Each tamper case edits a saved folder as an attacker or a bad disk would and checks that
`hwaware.load` refuses it naming the file (and the op or construct), before any kernel library
is loaded, and that a marker file the edit would write never appears.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hwaware
from hwaware import manifest
from hwaware.dynamic import host
from hwaware.dynamic.host import HostProgramError
from hwaware.dynamic.model import DynamicModel
from hwaware.manifest import ManifestError
from hwaware.program import DisallowedOpError
from hwaware.runtime import CompiledModel
from tests.helpers import resign

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hwaware"


class Gated(nn.Module):
    """A small dynamic network: one branch on a value the host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.c = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.mean() > 0.2:
            return self.b(h)
        return self.c(h) * 2


@functools.cache
def _static() -> tuple[nn.Module, CompiledModel]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    compiled = hwaware.compile(model, (torch.randn(2, 8),), db=None, show_progress=False)
    assert isinstance(compiled, CompiledModel)
    return model, compiled


@functools.cache
def _dynamic() -> tuple[nn.Module, DynamicModel]:
    torch.manual_seed(0)
    model = Gated().eval()
    compiled = hwaware.compile(model, (torch.randn(2, 8),), db=None, show_progress=False)
    assert isinstance(compiled, DynamicModel)
    return model, compiled


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    return _static()[1].save(tmp_path / "static")


@pytest.fixture
def dynamic_dir(tmp_path: Path) -> Path:
    return _dynamic()[1].save(tmp_path / "dynamic")


@pytest.fixture
def no_library_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every kernel library a load opens (the refusals must open none)."""
    from hwaware.tvm import vm

    opened: list[str] = []
    real = vm.load_executable
    monkeypatch.setattr(vm, "load_executable", lambda path: opened.append(path) or real(path))
    return opened


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------ manifest
def test_save_writes_a_manifest_over_every_file(static_dir: Path, dynamic_dir: Path) -> None:
    for directory, kind in ((static_dir, "compiled"), (dynamic_dir, "dynamic")):
        doc = json.loads((directory / manifest.MANIFEST_FILE).read_text())
        files = {p.relative_to(directory).as_posix() for p in directory.rglob("*")
                 if p.is_file() and p.name != manifest.MANIFEST_FILE}
        assert doc["kind"] == kind and set(doc["files"]) == files
        assert set(doc["versions"]) == {"hwaware", "tvm", "torch"}
        assert all(len(digest) == 64 for digest in doc["files"].values())
    assert any(name.endswith("kernels.so") for name in
               json.loads((dynamic_dir / manifest.MANIFEST_FILE).read_text())["files"])


@pytest.mark.parametrize("name", ["kernels.so", "weights.pt", "program.json", "meta.json"])
def test_a_flipped_byte_is_refused_before_any_library_loads(
        static_dir: Path, name: str, no_library_loads: list[str]) -> None:
    flip_byte(static_dir / name)
    with pytest.raises(ManifestError, match=rf"{name}: changed since the model was saved"):
        hwaware.load(static_dir)
    assert no_library_loads == []


def test_a_flipped_byte_in_a_region_library_is_refused(
        dynamic_dir: Path, no_library_loads: list[str]) -> None:
    library = next(dynamic_dir.glob("regions/*/*/kernels.so"))
    flip_byte(library)
    with pytest.raises(ManifestError, match=f"{library.relative_to(dynamic_dir)}: changed"):
        hwaware.load(dynamic_dir)
    assert no_library_loads == []


def test_a_missing_or_extra_file_is_refused(static_dir: Path, tmp_path: Path) -> None:
    (static_dir / "weights.pt").unlink()
    with pytest.raises(ManifestError, match=r"weights.pt: missing"):
        hwaware.load(static_dir)
    other = _static()[1].save(tmp_path / "other")
    (other / "extra.so").write_bytes(b"\x7fELF")
    with pytest.raises(ManifestError, match=r"extra.so: unexpected file"):
        hwaware.load(other)


def test_a_symbolic_link_is_refused(static_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copyfile(static_dir / "kernels.so", elsewhere)
    (static_dir / "kernels.so").unlink()
    (static_dir / "kernels.so").symlink_to(elsewhere)
    with pytest.raises(ManifestError, match="symbolic link"):
        hwaware.load(static_dir)


def test_a_save_without_manifest_is_refused_with_what_to_do(static_dir: Path) -> None:
    (static_dir / manifest.MANIFEST_FILE).unlink()
    with pytest.raises(ManifestError, match="no manifest.json.*compile and save it again"):
        hwaware.load(static_dir)


def test_saving_again_into_the_same_folder_loads(static_dir: Path) -> None:
    model, compiled = _static()
    compiled.save(static_dir)
    x = torch.randn(2, 8)
    torch.testing.assert_close(hwaware.load(static_dir)(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_truncated_file_is_refused(static_dir: Path, no_library_loads: list[str]) -> None:
    library = static_dir / "kernels.so"
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    with pytest.raises(ManifestError, match=r"kernels.so: changed since the model was saved"):
        hwaware.load(static_dir)
    assert no_library_loads == []


def test_save_refuses_a_folder_that_is_not_a_save(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine: exists and is not a saved hwaware model"):
        _static()[1].save(mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(".mine.*"))  # nothing left beside it either


def test_a_killed_saves_folder_is_refused_and_removed_by_the_next_save(
        static_dir: Path) -> None:
    """What a save killed part-way leaves (its real kill: tests/test_db_kill.py): a hidden
    folder beside the target, refused by load, removed by the next save once its process is
    gone; one whose process still runs is left alone."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    gone = static_dir.with_name(f".{static_dir.name}.partial-{ended.pid}-0a0a")
    shutil.copytree(static_dir, gone)
    (gone / manifest.MANIFEST_FILE).unlink()
    running = static_dir.with_name(f".{static_dir.name}.partial-{os.getpid()}-0b0b")
    running.mkdir()
    with pytest.raises(ManifestError, match=rf"{gone.name}: .*an unfinished save"):
        hwaware.load(gone)
    _static()[1].save(static_dir)
    assert not gone.exists() and running.exists()
    hwaware.load(static_dir)


# -------------------------------------------------------------------- op allowlist
def _marker_steps(marker: Path, first_slot: int) -> list[dict[str, Any]]:
    """Host steps that, were their ops resolved as Python names, write `marker`: x.numpy()
    through `operator.attrgetter` and `operator.call`, then ndarray.tofile(marker)."""
    s = first_slot
    return [
        {"kind": "op", "op": "operator.attrgetter", "args": ["numpy"], "kwargs": {}, "out": s},
        {"kind": "op", "op": "operator.call", "args": [{"v": s}, {"v": 0}], "kwargs": {},
         "out": s + 1},
        {"kind": "op", "op": "operator.call", "args": [{"v": s + 1}], "kwargs": {},
         "out": s + 2},
        {"kind": "op", "op": "operator.attrgetter", "args": ["tofile"], "kwargs": {},
         "out": s + 3},
        {"kind": "op", "op": "operator.call", "args": [{"v": s + 3}, {"v": s + 2}],
         "kwargs": {}, "out": s + 4},
        {"kind": "op", "op": "operator.call", "args": [{"v": s + 4}, str(marker)],
         "kwargs": {}, "out": s + 5},
    ]


def _edit_program(directory: Path, edit: Any) -> None:
    path = directory / "program.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_an_edited_program_is_refused_by_the_manifest(static_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    def inject(doc: dict[str, Any]) -> None:
        doc["steps"][:0] = _marker_steps(marker, doc["num_slots"])
        doc["num_slots"] += 6

    _edit_program(static_dir, inject)
    with pytest.raises(ManifestError, match="program.json: changed"):
        hwaware.load(static_dir)
    assert not marker.exists()


def test_a_resigned_program_calling_python_is_refused_naming_the_op(
        static_dir: Path, tmp_path: Path, no_library_loads: list[str]) -> None:
    marker = tmp_path / "pwned"

    def inject(doc: dict[str, Any]) -> None:
        doc["steps"][:0] = _marker_steps(marker, doc["num_slots"])
        doc["num_slots"] += 6

    _edit_program(static_dir, inject)
    resign(static_dir)
    with pytest.raises(DisallowedOpError, match=r"program.json: op 'operator.attrgetter' is "
                                                r"not allowed"):
        hwaware.load(static_dir)
    assert not marker.exists() and no_library_loads == []


@pytest.mark.parametrize("op", ["builtins.eval", "operator.call", "os.system.default",
                                "aten.__class__.default", "aten.from_file.default",
                                "torch.load.default"])
def test_ops_outside_the_allowlist_are_refused_naming_op_and_file(
        static_dir: Path, op: str) -> None:
    def rename_first_kernel_step(doc: dict[str, Any]) -> None:
        next(iter(doc["kernels"].values()))["steps"][0]["op"] = op

    _edit_program(static_dir, rename_first_kernel_step)
    resign(static_dir)
    with pytest.raises(DisallowedOpError, match=rf"program.json: op '{op}'"):
        hwaware.load(static_dir)


def test_registered_dunder_operators_resolve_and_namespace_attributes_do_not() -> None:
    """`x & y` exports to aten.__and__.Tensor (BERT's masks): a real operator, allowed; the
    namespace object's own attributes are not operators and stay refused."""
    from hwaware.program import resolve_op

    assert resolve_op("aten.__and__.Tensor") is torch.ops.aten.__and__.Tensor
    assert resolve_op("aten.add.Tensor") is torch.ops.aten.add.Tensor
    for op in ("aten.__class__.default", "aten.__dict__.default", "aten.__and__.nope"):
        with pytest.raises(DisallowedOpError):
            resolve_op(op)


def test_a_dtype_argument_names_only_torch_dtypes(static_dir: Path) -> None:
    def bad_dtype(doc: dict[str, Any]) -> None:
        doc["input_specs"][0]["dtype"] = "load"

    _edit_program(static_dir, bad_dtype)
    resign(static_dir)
    with pytest.raises(ValueError, match="'load' is not a torch dtype"):
        hwaware.load(static_dir)


# ------------------------------------------------------------ dynamic host program
def _json_ast(node: Any) -> Any:
    """Any syntax tree as `host_program.json` spells one (no checks: the attacker's)."""
    if isinstance(node, ast.AST):
        return {"_": type(node).__name__, **{f: _json_ast(getattr(node, f, None))
                                             for f in node._fields}}
    return [_json_ast(x) for x in node] if isinstance(node, list) else node


def _inject_host_statement(directory: Path, statement: str) -> None:
    path = directory / "host_program.json"
    doc = json.loads(path.read_text())
    doc["forward"]["body"][0]["body"][:0] = [_json_ast(s) for s in ast.parse(statement).body]
    path.write_text(json.dumps(doc))


def _host_plans() -> list[tuple[str, Any]]:
    from hwaware.dynamic.driver import plan_model
    from hwaware.dynamic_zoo import DYNAMIC_MODELS, get_dynamic_case
    from tests.conformance.dynamic_styles import CASES

    models = [(n, get_dynamic_case(n).model) for n in sorted(DYNAMIC_MODELS)]
    models += [(n, CASES[n]()[0]) for n in sorted(CASES)]
    return [(n, plan[1]) for n, m in models if (plan := plan_model(m)) is not None]


def test_every_generated_host_program_round_trips_through_its_declarative_form() -> None:
    """Every host program of the dynamic zoo and of the conformance styles passes the checks
    and comes back as the same tree (a save never writes what a load refuses)."""
    plans = _host_plans()
    assert len(plans) >= 20
    for name, plan in plans:
        source = plan.source()
        doc = json.loads(json.dumps(host.to_json(source, plan.regions)))
        tree = host.from_json(doc, plan.regions, name)
        assert ast.dump(tree) == ast.dump(ast.parse(source)), name


def test_an_edited_host_program_is_refused_by_the_manifest(dynamic_dir: Path,
                                                            tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _inject_host_statement(dynamic_dir, f"open({str(marker)!r}, 'w')")
    with pytest.raises(ManifestError, match="host_program.json: changed"):
        hwaware.load(dynamic_dir)
    assert not marker.exists()


@pytest.mark.parametrize(("statement", "refusal"), [
    ("open({marker!r}, 'w')", "name 'open'"),
    ("__import__('os')", "name '__import__'"),
    ("import os", "construct 'Import'"),
    ("x.__class__", "attribute '__class__'"),
    ("x.numpy().tofile({marker!r})", "attribute 'tofile'"),
    ("(lambda: open({marker!r}, 'w'))()", "construct 'Lambda'"),
    ("def f(): pass", "construct 'FunctionDef'"),
    ("math.__loader__", "attribute '__loader__'"),
])
def test_a_resigned_host_program_doing_more_than_hwaware_writes_is_refused(
        dynamic_dir: Path, tmp_path: Path, statement: str, refusal: str,
        no_library_loads: list[str]) -> None:
    marker = tmp_path / "pwned"
    _inject_host_statement(dynamic_dir, statement.format(marker=str(marker)))
    resign(dynamic_dir)
    with pytest.raises(HostProgramError, match=f"host_program.json: .*{refusal}"):
        hwaware.load(dynamic_dir)
    assert not marker.exists() and no_library_loads == []


@pytest.mark.parametrize("region", ["__builtins__", "_hw_decide", "len", "a.b"])
def test_a_region_named_like_anything_but_a_region_is_refused(dynamic_dir: Path,
                                                               region: str) -> None:
    doc = json.loads((dynamic_dir / "dynamic.json").read_text())
    doc["regions"][0]["name"] = region
    (dynamic_dir / "dynamic.json").write_text(json.dumps(doc))
    resign(dynamic_dir)
    with pytest.raises(HostProgramError, match=f"'{region}' is not a region name"):
        hwaware.load(dynamic_dir)


def test_host_program_py_is_never_executed(dynamic_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    readable = dynamic_dir / "host_program.py"
    readable.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + readable.read_text())
    for region in dynamic_dir.glob("regions/*.py"):
        region.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + region.read_text())
    resign(dynamic_dir)
    model, _ = _dynamic()
    loaded = hwaware.load(dynamic_dir)
    for x in (torch.randn(2, 8), -torch.rand(2, 8), torch.rand(2, 8) + 1):
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    assert not marker.exists()


# --------------------------------------------------------------- fresh process load
FRESH_LOAD = """
import sys, torch, hwaware
model = hwaware.load(sys.argv[1])
case = torch.load(sys.argv[2], weights_only=True)
for x, want in zip(case["x"], case["y"]):
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
print("ok", len(case["x"]))
"""


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_a_correct_save_loads_in_a_fresh_process_and_matches_eager(kind: str,
                                                                   tmp_path: Path) -> None:
    model, compiled = _static() if kind == "static" else _dynamic()
    saved = compiled.save(tmp_path / kind)
    xs = [torch.randn(2, 8) * 3, -torch.rand(2, 8), torch.rand(2, 8) + 1]  # not the example
    with torch.no_grad():
        torch.save({"x": xs, "y": [model(x) for x in xs]}, tmp_path / "case.pt")
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(saved), str(tmp_path / "case.pt")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["ok", "3"]


# ------------------------------------------------------------------ custom operators
class CallsCustomOperator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.ops.hwaware_test.running_max(torch.relu(self.fc1(x))) * 0.5)


def test_a_custom_operator_runs_in_pytorch_and_its_save_loads_where_it_is_installed(
        tmp_path: Path) -> None:
    """A third-party custom operator (torch.library.custom_op) runs in PyTorch with one warning
    naming it; a fresh process loading the save imports the module that defined it (recorded at
    save time) and matches eager; a save whose recorded module is not installed is refused,
    naming the operator's namespace."""
    import tests.custom_operators  # noqa: F401  (defines hwaware_test::running_max)

    torch.manual_seed(0)
    model = CallsCustomOperator().eval()
    with pytest.warns(UserWarning, match="hwaware_test.running_max"):
        compiled = hwaware.compile(model, (torch.randn(2, 8),), db=None, show_progress=False)
    assert compiled.program.custom_operator_modules() == ["tests.custom_operators"]
    xs = [torch.randn(2, 8) * 3, -torch.rand(2, 8), torch.rand(2, 8) + 1]
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        torch.save({"x": xs, "y": [model(x) for x in xs]}, tmp_path / "case.pt")
    saved = compiled.save(tmp_path / "saved")
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(saved), str(tmp_path / "case.pt")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((saved / "meta.json").read_text())
    (saved / "meta.json").write_text(json.dumps({**meta, "operator_modules": ["not_installed.x"]}))
    resign(saved)
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(saved), str(tmp_path / "case.pt")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert "DisallowedOpError" in done.stderr and \
        "import the library that defines namespace 'hwaware_test'" in done.stderr


class CallsLibraryOperator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.ops.hwaware_test_lib.clipped_square(self.fc(x)))


def test_an_operator_a_program_file_cannot_name_runs_but_is_not_saved(tmp_path: Path) -> None:
    """An operator registered another way than `custom_op` (C++ extensions: torchvision's `nms`)
    runs in PyTorch in this process; `save` refuses to write a program that names it, naming
    the op, instead of writing one `load` would refuse."""
    import tests.custom_operators  # noqa: F401  (registers hwaware_test_lib::clipped_square)

    torch.manual_seed(0)
    model = CallsLibraryOperator().eval()
    compiled = hwaware.compile(model, (torch.randn(2, 8),), db=None, show_progress=False)
    with torch.no_grad():
        for x in (torch.randn(2, 8) * 3, torch.rand(2, 8)):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(DisallowedOpError, match="hwaware_test_lib.clipped_square"):
        compiled.save(tmp_path / "saved")


def test_operators_of_torchs_own_namespaces_stay_refused() -> None:
    """Only custom operators defined outside torch widen the allowlist: torch's own internal
    namespaces (collectives, prims defined in Python, ...) do not resolve from a program."""
    from hwaware.program import resolve_op

    for op in ("_c10d_functional.all_reduce.default", "quantized.add.default",
               "streams.fork.default", "onnx_symbolic._symbolic.default"):
        with pytest.raises(DisallowedOpError):
            resolve_op(op)


# ----------------------------------------------------------- no unsafe deserialisation
UNSAFE_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
# exec / eval of hwaware's own code made at compile time (or from a checked tree on load), never
# of text from a file a user hands over: module path -> functions allowed to call them
ALLOWED_EXEC = {
    "hwaware/dynamic/host.py": {"make_forward"},      # compile time source, or checked tree
    "hwaware/dynamic/driver.py": {"region_function"},  # regions of the live model's forward
    "hwaware/dynamic/stage.py": {"_is_grad_mode", "static_value"},  # names of the live model
}


def _unsafe_uses(path: Path, root: Path = REPO) -> list[str]:
    """Every unsafe deserialisation in one source file: imports of pickle-like modules,
    `torch.load` without `weights_only=True`, and `eval` / `exec` outside ALLOWED_EXEC."""
    tree = ast.parse(path.read_text())
    relative = path.relative_to(root).as_posix()
    found = []
    for function, node in _calls_and_imports(tree):
        where = f"{relative}:{node.lineno}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            found += [f"{where} imports {n}" for n in names
                      if n.partition(".")[0] in UNSAFE_MODULES]
        elif _is_torch_load(node) and not _weights_only(node):
            found.append(f"{where} torch.load without weights_only=True")
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and \
                function not in ALLOWED_EXEC.get(relative, set()):
            found.append(f"{where} {node.func.id}() in {function}")
    return found


def _calls_and_imports(tree: ast.Module) -> list[tuple[str, Any]]:
    """(enclosing function name, node) for every call and import."""
    out: list[tuple[str, Any]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else function
            if isinstance(child, (ast.Call, ast.Import, ast.ImportFrom)):
                out.append((name, child))
            visit(child, name)

    visit(tree, "<module>")
    return out


def _is_torch_load(node: ast.Call) -> bool:
    f = node.func
    return isinstance(f, ast.Attribute) and f.attr == "load" and \
        isinstance(f.value, ast.Name) and f.value.id == "torch"


def _weights_only(node: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and
               k.value.value is True for k in node.keywords)


def test_the_package_has_no_unsafe_deserialisation() -> None:
    found = [use for path in sorted(PACKAGE.rglob("*.py")) for use in _unsafe_uses(path)]
    assert found == [], "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "hwaware" / "dynamic" / "host.py"  # exec outside make_forward
    bad.parent.mkdir(parents=True)
    bad.write_text("import pickle\nfrom cloudpickle import loads\nimport torch\n\n"
                   "def f(p):\n    exec(p)\n    return torch.load(p), "
                   "torch.load(p, weights_only=False), torch.load(p, weights_only=True)\n")
    found = _unsafe_uses(bad, tmp_path)
    assert [f.split(" ", 1)[1] for f in found] == [
        "imports pickle", "imports cloudpickle", "exec() in f",
        "torch.load without weights_only=True", "torch.load without weights_only=True"], found
