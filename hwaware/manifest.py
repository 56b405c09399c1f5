"""Saved-model integrity: `manifest.json`, a SHA-256 of every file a save wrote.

Goes in: a directory that `CompiledModel.save` or `DynamicModel.save` has just written, and the
list of files it wrote. Comes out: `manifest.json` (manifest version, model kind, the save's
format version, the hwaware / Apache TVM / PyTorch versions that wrote it, and one SHA-256 per
file). `verify` checks a directory against its manifest before `hwaware.load` reads anything
else in it (no native library is loaded, no program is read first) and refuses, naming the
file, one that changed, one that is missing, and one that the save did not write.

`save_atomically` is how both saves write (and the MetaSchedule cost model a tuning session
keeps per target, `hwaware.tvm.cost_model`): into a hidden folder beside the target
(`.NAME.partial-PID-*`), manifest last, then renamed into place. A save killed part-way leaves
the target as it was (absent, or the previous save) and a partial folder that `verify` refuses
as an unfinished save; the next save beside it removes such leftovers once their process is
gone.

What this protects against: corruption (a flipped byte in `kernels.so` runs as wrong numbers,
a segfault or an illegal instruction), truncation, and edits to a folder after it was saved.
What it does not: a folder made by someone you do not trust, who can write a matching manifest.
A compiled model contains native code; trust it as you would a program.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
KINDS = ("compiled", "dynamic", "search-cost-model")  # the last: `hwaware.tvm.cost_model`
SAVE_FILES = (MANIFEST_FILE, "meta.json", "dynamic.json")  # one of them: a folder a save wrote
_PARTIAL, _OLD = "partial", "old"  # hidden folders beside a save while it is written / swapped
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """A saved model's folder does not match its manifest (or has none)."""


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` holds."""

    kind: str  # one of KINDS
    format_version: int
    versions: dict[str, str]
    files: dict[str, str]  # path relative to the folder (POSIX) -> SHA-256 hex
    manifest_version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps({"manifest_version": self.manifest_version, "kind": self.kind,
                           "format_version": self.format_version, "versions": self.versions,
                           "files": self.files}, indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str, where: Path) -> Manifest:
        try:
            doc = json.loads(text)
            manifest = Manifest(doc["kind"], doc["format_version"], doc["versions"],
                                doc["files"], doc["manifest_version"])
        except (ValueError, KeyError, TypeError) as err:
            raise ManifestError(f"{where}: not a readable manifest ({err})") from err
        if manifest.manifest_version != MANIFEST_VERSION or manifest.kind not in KINDS \
                or not isinstance(manifest.files, dict):
            raise ManifestError(f"{where}: manifest version {manifest.manifest_version} / kind "
                                f"{manifest.kind!r} is not supported (this hwaware reads "
                                f"version {MANIFEST_VERSION}, kinds {list(KINDS)})")
        return manifest


def write(directory: Path, kind: str, format_version: int, files: list[str]) -> Path:
    """Write `directory/manifest.json` over `files` (paths relative to `directory`)."""
    manifest = Manifest(kind, format_version, writer_versions(),
                        {name: sha256(directory / name) for name in sorted(files)})
    out = directory / MANIFEST_FILE
    out.write_text(manifest.to_json())
    return out


def save_atomically(directory: str | os.PathLike[str], kind: str, format_version: int,
                    write_files: Callable[[Path], list[str]]) -> Path:
    """Save a model into `directory`: `write_files` fills a new hidden folder beside it and
    returns the files it wrote, the manifest goes in last, then the folder is renamed into
    place (replacing an earlier save there). Refuses a `directory` that holds anything but a
    save, naming it. Returns `directory`."""
    out = Path(directory)
    target = out.resolve()
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    partial = _beside(target, _PARTIAL)
    partial.mkdir()
    try:
        write(partial, kind, format_version, write_files(partial))
        _rename_into_place(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a folder; save into a new folder")
    if any(target.iterdir()) and not any((target / name).exists() for name in SAVE_FILES):
        raise FileExistsError(f"{target}: exists and is not a saved hwaware model (none of "
                              f"{list(SAVE_FILES)}); save into a new or empty folder")


def _beside(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _rename_into_place(partial: Path, target: Path) -> None:
    """`partial` becomes `target`; an earlier save there is moved aside first, then removed."""
    if not target.exists():
        os.rename(partial, target)
        return
    old = _beside(target, _OLD)
    os.rename(target, old)
    os.rename(partial, target)
    shutil.rmtree(old)


def _remove_leftovers(target: Path) -> None:
    """Remove the hidden folders of earlier saves to `target` whose process is gone (killed
    part-way); a save still running elsewhere keeps its own."""
    for tag in (_PARTIAL, _OLD):
        for path in target.parent.glob(f".{glob.escape(target.name)}.{tag}-*"):
            pid = path.name[len(f".{target.name}.{tag}-"):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_unfinished_save(directory: Path) -> bool:
    """A hidden folder a save was writing when it stopped (`save_atomically`)."""
    name = directory.name
    return name.startswith(".") and f".{_PARTIAL}-" in name


def verify(directory: Path) -> Manifest:
    """The manifest of `directory` once every file matches it; raises `ManifestError` naming
    the first file that changed, is missing, or was not written by the save."""
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ManifestError(f"{directory}: no such folder")
    if not path.is_file():
        hint = " (saved by an hwaware older than manifests: compile and save it again)" \
            if (directory / "meta.json").exists() or (directory / "dynamic.json").exists() \
            else ""
        if is_unfinished_save(directory):
            hint = " (an unfinished save: the process writing it stopped; save the model again)"
        raise ManifestError(f"{directory}: not a saved hwaware model, no {MANIFEST_FILE}{hint}")
    manifest = Manifest.from_json(path.read_text(), path)
    present = _files_in(directory)
    extra, missing = sorted(present - set(manifest.files)), sorted(set(manifest.files) - present)
    if extra:
        raise ManifestError(f"{directory / extra[0]}: unexpected file, not written by the save "
                            f"(not in {MANIFEST_FILE}); remove it or save the model again")
    if missing:
        raise ManifestError(f"{directory / missing[0]}: missing ({MANIFEST_FILE} lists it)")
    for name, digest in sorted(manifest.files.items()):
        if sha256(directory / name) != digest:
            raise ManifestError(f"{directory / name}: changed since the model was saved "
                                f"(SHA-256 differs from {MANIFEST_FILE}); refusing to load it")
    return manifest


def _files_in(directory: Path) -> set[str]:
    """Every file under `directory` but the manifest, as relative POSIX paths; a symbolic link
    is refused (a save writes none)."""
    out = set()
    for path in directory.rglob("*"):
        if path.is_symlink():
            raise ManifestError(f"{path}: a symbolic link; a saved model holds none")
        if path.is_file() and path != directory / MANIFEST_FILE:
            out.add(path.relative_to(directory).as_posix())
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def writer_versions() -> dict[str, str]:
    """hwaware, Apache TVM and PyTorch versions, from package metadata (imports none of them)."""
    return {name: _version(dist) for name, dist in
            (("hwaware", "hwaware"), ("tvm", "apache-tvm"), ("torch", "torch"))}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

