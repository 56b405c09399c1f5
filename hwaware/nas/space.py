"""Search spaces as data: a JSON file of genes and constants plus a builder, registered once.

Goes in: a space name (a file in `hwaware/nas/spaces/`) or the path of a user's space file. The
file names the space's genes (each a choice list, or `length` choices of one list, or one list
per position; `"specialize": false` on input sizes and depths, which `hwaware nas space` keeps
whole), the constants its builder reads, and the builder (a name in
`hwaware.nas.builders.BUILDERS`). Comes out: a `Space`:
- `sample(n, seed)` -> `Arch`s: plain mappings of gene name to value (lists for list genes),
  frozen, hashable, and JSON-serialisable as they are (`json.dumps(arch)`);
- `validate(mapping)` -> the `Arch`, or a `SpaceError` naming the field and its allowed values;
- `encode(archs)` -> an int matrix of choice indices (one column per gene position), the form
  NSGA-II and the latency table work on; `decode(row)` back;
- `build(arch)` -> a plain `torch.nn.Module` (eval mode, seeded weights) and
  `example_inputs(arch)`, which `hwaware.compile` takes like any other model;
- `blocks(arch)`: the builder's blocks (the latency table's unit of caching).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPACES_DIR = Path(__file__).parent / "spaces"


class SpaceError(ValueError):
    """A space file that does not parse, or an architecture outside its space."""


class Arch(dict):  # type: ignore[type-arg]
    """An architecture: gene name -> value (a tuple for list genes). Frozen and hashable, and a
    `dict`, so `json.dumps` takes it as it is; `copy.deepcopy` gives a plain, editable dict."""

    def __init__(self, values: Mapping[str, Any] | Iterable[tuple[str, Any]]):
        super().__init__({k: tuple(v) if isinstance(v, (list, tuple)) else v
                          for k, v in dict(values).items()})

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _frozen(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an Arch is frozen: edit a copy (dict(arch) or copy.deepcopy(arch))")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _frozen
    __ior__ = _frozen

    def __deepcopy__(self, memo: Any) -> dict[str, Any]:
        return self.to_dict()

    def __reduce__(self) -> Any:
        return (Arch, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict with lists (the form Once-for-All's code edits in place)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.items()}


@dataclass(frozen=True)
class Gene:
    """One encoded position: `name` (or `name[index]` of a list gene) and its choices."""

    name: str
    index: int | None
    choices: tuple[Any, ...]
    specialize: bool = True  # False: an input size or a depth, which `nas space` never prunes

    @property
    def label(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"


class Space:
    """A search space: its genes, its constants and its builder (see the module docstring)."""

    def __init__(self, doc: dict[str, Any], source: str):
        from hwaware.nas.builders import BUILDERS

        self.source = source
        self.name = _field(doc, "name", str, source)
        self.description = doc.get("description", "")
        self.constants: dict[str, Any] = doc.get("constants", {})
        builder = _field(doc, "builder", str, source)
        if builder not in BUILDERS:
            raise SpaceError(f"{source}: builder {builder!r} is not registered; registered: "
                             f"{', '.join(sorted(BUILDERS))} (hwaware/nas/builders.py)")
        self.builder_name = builder
        self.builder = BUILDERS[builder](self)
        self.groups = _genes(doc, source)
        self.genes = [g for group in self.groups.values() for g in group]

    def __repr__(self) -> str:
        return f"Space({self.name!r}, {len(self.genes)} genes, {self.size:.3g} architectures)"

    @property
    def size(self) -> float:
        """How many gene combinations the space has (architectures, counted with repeats where
        a gene is inactive)."""
        return float(np.prod([float(len(g.choices)) for g in self.genes]))

    @cached_property
    def column(self) -> dict[str, int]:
        """Encoded column of each gene position, by label (`"ks[3]"`, `"image_size"`)."""
        return {g.label: i for i, g in enumerate(self.genes)}

    # -------------------------------------------------------------------- archs
    def sample(self, n: int, seed: int = 0) -> list[Arch]:
        """`n` architectures drawn uniformly per gene, reproducibly from `seed`."""
        rng = np.random.default_rng(seed)
        rows = np.stack([rng.integers(0, len(g.choices), size=n) for g in self.genes], axis=1)
        return [self.decode(row) for row in rows]

    def validate(self, arch: Mapping[str, Any]) -> Arch:
        """`arch` as an `Arch`, or a `SpaceError` naming the first bad field."""
        if not isinstance(arch, Mapping):
            raise SpaceError(f"{self.name}: an architecture is a mapping of "
                             f"{', '.join(self.groups)}; got {type(arch).__name__}")
        extra = set(arch) - set(self.groups)
        if extra:
            raise SpaceError(f"{self.name}: unknown field(s) {', '.join(sorted(extra))}; the "
                             f"fields are {', '.join(self.groups)}")
        for name, genes in self.groups.items():
            _check_group(self.name, name, genes, arch.get(name))
        return arch if isinstance(arch, Arch) else Arch(arch)

    def encode(self, archs: Iterable[Mapping[str, Any]]) -> np.ndarray:
        """Choice indices, one row per architecture and one column per gene position."""
        rows = [[g.choices.index(_value(a, g)) for g in self.genes]
                for a in map(self.validate, archs)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, len(self.genes))

    def decode(self, row: Sequence[int] | np.ndarray) -> Arch:
        """The architecture of one encoded row."""
        values: dict[str, Any] = {}
        for g, i in zip(self.genes, row, strict=True):
            choice = g.choices[int(i)]
            if g.index is None:
                values[g.name] = choice
            else:
                values.setdefault(g.name, []).append(choice)
        return Arch(values)

    def mutate(self, arch: Mapping[str, Any], rng: random.Random, probability: float) -> Arch:
        """A copy with each gene position redrawn with `probability`."""
        row = self.encode([arch])[0]
        for i, g in enumerate(self.genes):
            if rng.random() < probability:
                row[i] = rng.randrange(len(g.choices))
        return self.decode(row)

    # ------------------------------------------------------------------ models
    def build(self, arch: Mapping[str, Any]) -> torch.nn.Module:
        """The architecture as a plain eval-mode module with weights seeded by the arch."""
        arch = self.validate(arch)
        torch.manual_seed(_seed(arch))
        return self.builder.build(arch).eval()

    def example_inputs(self, arch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """Inputs of the shape `build(arch)` runs on (seeded)."""
        arch = self.validate(arch)
        torch.manual_seed(_seed(arch) + 1)
        return self.builder.example_inputs(arch)

    def blocks(self, arch: Mapping[str, Any]) -> list[Any]:
        """The builder's blocks of `arch`, one per slot (None where the slot is inactive)."""
        return self.builder.blocks(self.validate(arch))

    def params(self, arch: Mapping[str, Any]) -> int:
        """Parameter count of the built model."""
        return sum(p.numel() for p in self.build(arch).parameters())


# ------------------------------------------------------------------------------- registry
def space_names() -> list[str]:
    """The spaces shipped with hwaware."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.json"))


def get_space(name: str | Path) -> Space:
    """A shipped space by name, or a user's space file by path."""
    path = Path(name)
    if path.suffix != ".json":
        path = SPACES_DIR / f"{name}.json"
        if not path.exists():
            raise SpaceError(f"unknown space {name!r}; shipped: {', '.join(space_names())} "
                             f"(or give the path of a space .json file)")
    return _load(path)


def _load(path: Path) -> Space:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise SpaceError(f"{path}: cannot read the space file: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise SpaceError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from e
    if not isinstance(doc, dict):
        raise SpaceError(f"{path}: a space file is a JSON object")
    return Space(doc, str(path))


def space_file_text(doc: dict[str, Any]) -> str:
    """A space document as the shipped files write it: one line per gene and constant."""
    def entries(items: list[str], close: str, last: bool) -> list[str]:
        return [*(f"    {x}," for x in items[:-1]), *(f"    {x}" for x in items[-1:]),
                f"  {close}" + ("" if last else ",")]

    keys = list(doc)
    lines = ["{"]
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if key == "genes":
            lines += ['  "genes": [', *entries([json.dumps(g) for g in doc[key]], "]", last)]
        elif key == "constants":
            items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in doc[key].items()]
            lines += ['  "constants": {', *entries(items, "}", last)]
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(doc[key])}" + ("" if last else ","))
    return "\n".join([*lines, "}"]) + "\n"


def _field(doc: dict[str, Any], key: str, kind: type, source: str) -> Any:
    if not isinstance(doc.get(key), kind):
        raise SpaceError(f"{source}: field {key!r} must be a {kind.__name__}")
    return doc[key]


def _genes(doc: dict[str, Any], source: str) -> dict[str, list[Gene]]:
    groups: dict[str, list[Gene]] = {}
    for i, spec in enumerate(_field(doc, "genes", list, source)):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
                or not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise SpaceError(f"{source}: genes[{i}] needs a 'name' and a non-empty 'choices'")
        name, choices, length = spec["name"], spec["choices"], spec.get("length")
        specialize = bool(spec.get("specialize", True))
        if length is None:
            groups[name] = [Gene(name, None, tuple(choices), specialize)]
            continue
        per_index = choices if isinstance(choices[0], list) else [choices] * int(length)
        if len(per_index) != length:
            raise SpaceError(f"{source}: gene {name!r} has {len(per_index)} choice lists for "
                             f"length {length}")
        groups[name] = [Gene(name, j, tuple(c), specialize) for j, c in enumerate(per_index)]
    return groups


def _check_group(space: str, name: str, genes: list[Gene], value: Any) -> None:
    if value is None:
        raise SpaceError(f"{space}: field {name!r} is missing")
    if genes[0].index is None:
        _check_value(space, genes[0], value)
        return
    if not isinstance(value, (list, tuple)) or len(value) != len(genes):
        raise SpaceError(f"{space}: field {name!r} must be a list of {len(genes)} values")
    for gene, v in zip(genes, value, strict=True):
        _check_value(space, gene, v)


def _check_value(space: str, gene: Gene, value: Any) -> None:
    if value not in gene.choices or isinstance(value, bool) != isinstance(gene.choices[0], bool):
        allowed = ", ".join(map(str, gene.choices))
        raise SpaceError(f"{space}: {gene.label} = {value!r} is not allowed; allowed: {allowed}")


def _value(arch: Mapping[str, Any], gene: Gene) -> Any:
    value = arch[gene.name]
    return value if gene.index is None else value[gene.index]


def _seed(arch: Arch) -> int:
    import hashlib

    text = json.dumps(arch, sort_keys=True)
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def iter_blocks(space: Space, archs: Iterable[Mapping[str, Any]]) -> Iterator[Any]:
    """Every block of every architecture (active slots only)."""
    for arch in archs:
        yield from (b for b in space.blocks(arch) if b is not None)
