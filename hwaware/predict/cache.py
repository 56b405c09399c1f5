"""Kernel records of decomposed networks, kept on disk across runs (decomposing is the slow part).

Goes in: a file path (one per name of what is decomposed and version of the decomposing code,
`code_fingerprint`: a change to capture, rewrites, partition, the kernel patterns, the NAS
builders or the predictor's spaces starts a new file rather than reuse stale kernels) and text
keys (a NAS block in its context, a sampled architecture's id). Comes out: each key's kernel
records (`hwaware.decompose.KernelRecord`) and host op steps, one JSONL line per key, appended as
they are found. A torn or unreadable line is skipped (its key is decomposed again); a read-only
home only loses the cache. Users: `hwaware.nas.table.BlockKernelCache`, `predict.pretrain`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from hwaware.decompose import KernelRecord

log = logging.getLogger(__name__)

# The code a decomposition depends on (globs under the `hwaware` package).
DECOMPOSING_CODE = ("capture.py", "decompose.py", "partition.py", "aten_ops.py", "rewrite/*.py",
                    "kernels/*.py", "nas/builders.py", "predict/spaces.py")


class KernelRecordCache:
    """Decompositions by text key in one JSONL file (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, tuple[list[KernelRecord], int]] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                doc = json.loads(line)
                records = [KernelRecord.from_json(r) for r in doc["records"]]
                self.entries[doc["key"]] = (records, int(doc["host_steps"]))
            except (ValueError, KeyError, TypeError) as err:  # a torn last line: recompute
                log.info("%s:%d: skipped (%s)", self.path, number, err)

    def lookup(self, key: str) -> tuple[list[KernelRecord], int] | None:
        return self.entries.get(key)

    def store(self, key: str, records: list[KernelRecord], host_steps: int) -> None:
        self.entries[key] = (records, host_steps)
        line = json.dumps({"key": key, "host_steps": host_steps,
                           "records": [json.loads(r.to_json()) for r in records]})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(line + "\n")
        except OSError as err:  # a read-only home: the cache is only an optimisation
            log.info("kernel cache %s not written: %s", self.path, err)


def code_fingerprint(name: str) -> str:
    """A hash of `name`, the torch version and the code a decomposition depends on."""
    import torch

    import hwaware

    root = Path(hwaware.__file__).parent
    parts = [name.encode(), torch.__version__.encode()]
    for pattern in DECOMPOSING_CODE:
        parts += [p.read_bytes() for p in sorted(root.glob(pattern))]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]
