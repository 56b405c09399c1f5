"""Output containers across save and load (stage 6): what a saved model returns in a new process.

A compiled model keeps the structure of its outputs as a `torch.utils._pytree` tree spec, saved
as `treespec_dumps` JSON that names every container by its pytree `serialized_type_name`. A
container that is not a pytree builtin (a Hugging Face `ModelOutput`, a dataclass or namedtuple
registered with pytree) is known to pytree only once the module that defines it was imported,
so a process that imports nothing of the user's could not read the spec back.

Goes in at save (`describe`): the live tree spec. Comes out: `OutputTypes` (JSON in meta.json),
the module that defines each non-builtin container type, and a *portable* spec of the same tree
with a plain dict (same keys, same order) in place of each such container.
Goes in at load (`loadable_spec`): the saved spec and that metadata. It imports a recorded
module whose type is not registered yet, when the module's top-level package is installed
(only recorded modules: as trusted as the saved `kernels.so` the load runs anyway), so the same
container type as eager comes back. Comes out: the spec to run with, where a container still
unknown is read from the portable spec, i.e. comes back as a dict; the loader collects those
types and warns once for all the models it loads (`warn_dict_fallback`).

The same import of recorded modules serves the modules that define a saved program's custom
operators (`import_recorded_modules`), which must be registered before the program is read.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import types
import warnings
from collections import OrderedDict, defaultdict, deque, namedtuple
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hwaware.program import dump_tree_spec

log = logging.getLogger(__name__)

# containers pytree serializes by itself (a namedtuple needs its class registered: not here)
_BUILTIN_CONTAINERS = frozenset({tuple, list, dict, OrderedDict, defaultdict, deque})
_NAMEDTUPLE = "collections.namedtuple"


class OutputTypeWarning(UserWarning):
    """A loaded model returns a dict where eager returns a container type it cannot import."""


@dataclass(frozen=True)
class OutputTypes:
    """The non-builtin containers of a saved output spec (in meta.json from save format 2)."""

    modules: dict[str, str]  # pytree serialized type name -> module that defines the type
    portable: str  # treespec_dumps of the same tree, dicts in place of those containers

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(doc: dict[str, Any]) -> OutputTypes:
        return OutputTypes(dict(doc["modules"]), doc["portable"])


# --------------------------------------------------------------------------- capture
def make_serializable(spec: pytree.TreeSpec) -> None:
    """Give every namedtuple class in `spec` a pytree serialization name (its module and
    qualified name) if it has none: pytree flattens any namedtuple but serializes only
    registered ones, and a model returning a plain namedtuple could not be compiled."""
    if spec.is_leaf():
        return
    for child in spec.children():
        make_serializable(child)
    if spec.type is namedtuple and spec.context not in pytree.SUPPORTED_SERIALIZED_TYPES:
        _register_namedtuple(spec.context)


def _register_namedtuple(cls: type) -> None:
    pytree._register_namedtuple(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


# ------------------------------------------------------------------------------ save
def describe(spec: pytree.TreeSpec) -> OutputTypes:
    """What a save records of its output spec (see `OutputTypes`)."""
    modules: dict[str, str] = {}
    portable = _portable(spec, modules)
    return OutputTypes(modules, dump_tree_spec(portable))


def _portable(spec: pytree.TreeSpec, modules: dict[str, str]) -> pytree.TreeSpec:
    if spec.is_leaf():
        return spec
    children = [_portable(child, modules) for child in spec.children()]
    cls = spec.context if spec.type is namedtuple else spec.type
    if cls in _BUILTIN_CONTAINERS or cls.__module__ == "torch.return_types":
        return pytree.TreeSpec(spec.type, spec.context, children)
    modules[pytree.SUPPORTED_SERIALIZED_TYPES[cls].serialized_type_name] = cls.__module__
    return pytree.TreeSpec(dict, _keys(spec), children)


def _keys(spec: pytree.TreeSpec) -> list[Any]:
    """The keys of a container's children, as pytree's key paths name them (field names,
    mapping keys); their positions when the type gives no keys."""
    try:
        tree = spec.unflatten([torch.empty(0)] * spec.num_leaves)
        pairs, _ = pytree.SUPPORTED_NODES[spec.type].flatten_with_keys_fn(tree)  # type: ignore[misc]
        keys = [_plain_key(k) for k, _ in pairs]
    except Exception as err:  # noqa: BLE001 - no keys (or no instance): positions then
        log.debug("no key paths for %s (%s): keys are positions", spec.type, err)
        keys = []
    if len(keys) != spec.num_children or len(set(keys)) != len(keys):
        keys = list(range(spec.num_children))
    return keys


def _plain_key(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):  # MappingKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            key = getattr(entry, attr)
            return key if isinstance(key, (str, int)) else str(key)
    return str(entry)


# ------------------------------------------------------------------------------ load
def loadable_spec(out_spec: str, saved: OutputTypes | None, missing: dict[str, str]) -> str:
    """The output spec a loaded model runs with: `out_spec` once every container type in it is
    registered (importing the recorded modules for that), else the same tree with a dict in
    place of each unknown container; those types go into `missing` (name -> module). A save
    without metadata (`saved` None, older hwaware) gives `out_spec` back as it is."""
    if saved is None:
        return out_spec
    _import_recorded(saved.modules)
    protocol, schema = json.loads(_pytree_part(out_spec))
    unknown: set[str] = set()
    merged = _known_or_dict(schema, json.loads(_pytree_part(saved.portable))[1], unknown)
    if not unknown:
        return out_spec
    missing.update({name: saved.modules.get(name, "?") for name in unknown})
    return _with_pytree_part(out_spec, json.dumps([protocol, merged]))


def _pytree_part(text: str) -> str:
    """The `treespec_dumps` JSON inside a spec `dump_tree_spec` wrote (it wraps the spec with
    PyTorch's return types when it has some)."""
    doc = json.loads(text)
    return str(doc["spec"]) if isinstance(doc, dict) else text


def _with_pytree_part(text: str, part: str) -> str:
    doc = json.loads(text)
    return json.dumps({**doc, "spec": part}) if isinstance(doc, dict) else part


def _import_recorded(modules: dict[str, str]) -> None:
    for name, module in modules.items():
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE or not _installed(module):
            continue
        try:
            imported = importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - a module that fails to import: a dict then
            log.info("importing %s for output type %s failed: %s", module, name, err)
            continue
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and \
                isinstance(imported, types.ModuleType):
            _register_found_namedtuple(imported, name)


def import_recorded_modules(modules: list[str], what: str) -> None:
    """Import each recorded module whose top-level package is installed here (the modules that
    define a saved model's custom operators: as trusted as its `kernels.so`); one that is not
    installed or fails to import is skipped (the program's check then names what is missing)."""
    for module in modules:
        if not _installed(module):
            continue
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - the op check names what is still missing
            log.info("importing %s for %s failed: %s", module, what, err)


def _register_found_namedtuple(module: Any, name: str) -> None:
    """A namedtuple that hwaware named at compile time (`make_serializable`): registered again
    here, where its module has just been imported."""
    qualname = name.removeprefix(module.__name__ + ".")
    cls: Any = module
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields"):
        _register_namedtuple(cls)


def _installed(module: str) -> bool:
    """Whether the module's top-level package can be imported here (never imports it)."""
    top = module.partition(".")[0]
    if top == "__main__":  # the saving script: not this process's
        return False
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _known_or_dict(node: dict[str, Any], portable: dict[str, Any], unknown: set[str]
                   ) -> dict[str, Any]:
    """A serialized spec node as is when pytree knows its type, else its portable dict node."""
    children = [_known_or_dict(child, other, unknown) for child, other in
                zip(node["children_spec"], portable["children_spec"], strict=True)]
    name = node["context"] if node["type"] == _NAMEDTUPLE else node["type"]
    if name is None or name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        return {**node, "children_spec": children}
    unknown.add(name)
    return {**portable, "children_spec": children}


def warn_dict_fallback(missing: dict[str, str]) -> None:
    """One warning for every container type a load returns as a dict (none: no warning)."""
    if not missing:
        return
    types = ", ".join(f"{name} (module {module})" for name, module in sorted(missing.items()))
    warnings.warn(f"output container type(s) {types} cannot be imported in this process: "
                  "the loaded model returns a dict with the same keys in place of each",
                  OutputTypeWarning, stacklevel=3)
