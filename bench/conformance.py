"""Conformance of hwaware on third-party models: the whole corpus through every entry point.

Per model of `tests/conformance/models.py` (transformers, torch_geometric, dynamic styles), in
its own worker subprocess with a time limit per entry point: eager, `hwaware.compile`, save ->
`hwaware.load` in a fresh process, `torch.compile(backend="hwaware")` and ONNX export ->
`hwaware.compile("model.onnx")`, each compared with eager on every example input; hwaware's
warnings, compile times and the share of FLOPs on TVM kernels (see
`tests/conformance/harness.py`). Writes a Markdown report and the raw rows as JSON beside it,
rewritten after each model, so a run stopped early keeps what it measured.

    python bench/conformance.py                          # all models, 600 s per entry point
    python bench/conformance.py --models bert,gcn --timeout 300 --out bench/results/c.md
    python bench/conformance.py --from-json bench/conformance-zen5-2c.json   # re-render only
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conformance import report  # noqa: E402
from tests.conformance.harness import DEFAULT_TIMEOUT_S, ModelRow, run_corpus  # noqa: E402
from tests.conformance.models import CASES, FAMILIES  # noqa: E402


def cpu_tag() -> str:
    """A short name for this CPU kind and core count, e.g. `zen5-2c`, `cascadelake-2c`."""
    import hwaware

    target = hwaware.get_target("host")
    kind = str(target.tvm.get("mcpu", platform.machine())).replace("znver", "zen")
    return f"{kind}-{target.cores}c"


def describe_machine() -> dict[str, Any]:
    """The facts a reader needs next to the table: CPU, versions."""
    import torch
    import tvm

    import hwaware

    versions = {"torch": torch.__version__, "tvm": tvm.__version__}
    for name in ("transformers", "torch_geometric", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return {"cpu": f"{_lscpu_model()}, {cpu_tag()}",
            "host target": hwaware.get_target("host").description,
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "commit": _git("rev-parse", "--short", "HEAD")}


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in out.splitlines()
             if line.startswith("Model name")]
    return names[0] if names else platform.machine()


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def select(models: str | None, families: str | None) -> list[str]:
    names = list(CASES) if not models else models.split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(CASES)}")
    if families:
        wanted = set(families.split(","))
        if wanted - set(FAMILIES):
            raise SystemExit(f"unknown family in {families!r}; known: {', '.join(FAMILIES)}")
        names = [n for n in names if CASES[n].family in wanted]
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated corpus names (default: all)")
    parser.add_argument("--families", help=f"only these families ({', '.join(FAMILIES)})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds per entry point of a model (default %(default)s)")
    parser.add_argument("--out", type=Path, help="Markdown report (default "
                        "bench/conformance-<cpu>.md); the JSON rows go beside it")
    parser.add_argument("--work", type=Path, help="keep each model's files and logs here")
    parser.add_argument("--from-json", type=Path, help="only rewrite the Markdown report of "
                        "the JSON rows of an earlier run (to --out, default: beside it)")
    args = parser.parse_args()
    if args.from_json:
        rows, meta = report.from_json(args.from_json.read_text())
        out = args.out or args.from_json.with_suffix(".md")
        out.write_text(report.markdown(rows, meta))
        print(f"wrote {out}")
        return 0
    names = select(args.models, args.families)
    out = args.out or ROOT / "bench" / f"conformance-{cpu_tag()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**describe_machine(), "timeout per entry point": f"{args.timeout:.0f} s",
            "models": len(names), "command": " ".join(["python", *sys.argv])}
    rows: list[ModelRow] = []
    start = time.time()

    def write(row: ModelRow) -> None:
        rows.append(row)
        meta["wall time"] = f"{(time.time() - start) / 60:.1f} min for {len(rows)} models"
        out.write_text(report.markdown(rows, meta))
        out.with_suffix(".json").write_text(report.to_json(rows, meta))
        cells = " ".join(f"{e}={row.entries[e].status}" for e in row.entries)
        print(f"[{len(rows)}/{len(names)}] {row.name} ({row.wall_s:.0f} s): {cells}", flush=True)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # SIGTERM as an exception, so the running worker is stopped with this process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_corpus(names, args.timeout, args.work, on_row=write)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
