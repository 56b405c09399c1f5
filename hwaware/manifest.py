"""Saved-model integrity: `manifest.json`, a SHA-256 of every file a save wrote.

Goes in: a directory that `CompiledModel.save` or `DynamicModel.save` has just written, and the
list of files it wrote. Comes out: `manifest.json` (manifest version, model kind, the save's
format version, the hwaware / Apache TVM / PyTorch versions that wrote it, and one SHA-256 per
file). `verify` checks a directory against its manifest before `hwaware.load` reads anything
else in it (no native library is loaded, no program is read first) and refuses, naming the
file, one that changed, one that is missing, and one that the save did not write.

What this protects against: corruption (a flipped byte in `kernels.so` runs as wrong numbers,
a segfault or an illegal instruction), truncation, and edits to a folder after it was saved.
What it does not: a folder made by someone you do not trust, who can write a matching manifest.
A compiled model contains native code; trust it as you would a program.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
KINDS = ("compiled", "dynamic")
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

