"""Kernel table: each fused kernel family against its peers and its own unfused version, in one run.

Per workload (a zoo model that is one block, one attention or one GNN layer, batch 1):
eager PyTorch (for GNN layers that is PyTorch Geometric itself), torch.compile (Inductor),
PyTorch SDPA (attention: the same attention through `F.scaled_dot_product_attention`), ONNX
Runtime (static conv and attention workloads), hwaware unfused (`fuse=False`: the ordinary
contraction + epilogue kernels, tuned) and hwaware fused (`hwaware.kernels`, tuned). Each hwaware
variant first gets a tuning session of `--trials` into `--db` (records already there count).

Every output is checked against eager; timings are medians of `--repeats` calls, interleaved
(round robin) and solo. The table gives fused vs unfused, fused vs the best correct peer (solo
medians), and the fused kernel's GFLOP/s and fraction of the target's FP32 peak.

    python bench/kernels.py --trials 256 --db tuning_logs/bench-kernels.db \
        --out bench/results/kernels.md
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from run import (  # noqa: E402
    CORES,
    Impl,
    _cpu_name,
    _mark,
    _ms,
    _versions,
    make_eager,
    make_hwaware,
    make_inductor,
    make_ort,
    measure,
    run_each,
    run_tuning,
    write_report,
)

from hwaware.target import Target, get_target  # noqa: E402
from hwaware.zoo import ZOO, get_model  # noqa: E402

HWAWARE = ("hwaware unfused", "hwaware fused")


@dataclass(frozen=True)
class Workload:
    """A zoo model standing for one kernel family, and the peers that fit it."""

    zoo: str
    family: str
    sdpa_peer: str | None = None  # the zoo model computing the same through F.sdpa
    ort: bool = True


WORKLOADS = {w.zoo: w for w in [
    Workload("mobilenetv2_block", "conv_block"),
    Workload("mobilenetv3_block_se", "conv_block"),
    Workload("convnext_block", "convnext_block"),
    Workload("resnet_basic_block", "res_block"),
    Workload("resnet_bottleneck", "res_block"),
    Workload("gcn_layer", "gnn", ort=False),
    Workload("sage_layer", "gnn", ort=False),
    Workload("sage_max_layer", "gnn", ort=False),
    Workload("gat_layer", "gnn", ort=False),
    Workload("rgcn_layer", "rgcn", ort=False),
    Workload("attention_core", "attention", sdpa_peer="sdpa_attention"),
    Workload("causal_attention_core", "attention"),
]}


@dataclass
class Row:
    workload: Workload
    impls: list[Impl] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    flops: int = 0


def on_device(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], device: str
              ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The model and its inputs where the target runs (a cuda target: the GPU)."""
    return model.to(device), tuple(x.to(device) for x in inputs)


def device_of(target_name: str) -> str:
    return "cuda" if get_target(target_name).kind == "cuda" else "cpu"


def sdpa_impl(workload: Workload, small: bool, device: str) -> Impl:
    """The same attention through F.scaled_dot_product_attention (PyTorch's fused kernel)."""
    if workload.zoo == "causal_attention_core":
        from hwaware.zoo import CausalAttentionCore

        _, inputs = get_model(workload.zoo, small)
        peer, inputs = on_device(CausalAttentionCore(inputs[0].shape[-2], sdpa=True).eval(),
                                 inputs, device)
        return Impl("pytorch sdpa", lambda: peer(*inputs))
    assert workload.sdpa_peer is not None
    model, inputs = on_device(*get_model(workload.sdpa_peer, small), device)
    return Impl("pytorch sdpa", lambda: model(*inputs))


def bench_workload(workload: Workload, args: argparse.Namespace, work: Path) -> Row:
    device = device_of(args.target)
    model, inputs = on_device(*get_model(workload.zoo, small=args.small), device)
    row = Row(workload)
    with torch.no_grad():
        expected = model(*inputs)
    eager = make_eager(model, inputs)
    if workload.family in ("gnn", "rgcn"):
        eager.name, eager.note = "pyg (eager)", "PyTorch Geometric"
    row.impls.append(eager)
    if not args.skip_inductor:
        row.impls.append(make_inductor(model, inputs))
    if workload.family == "attention":
        row.impls.append(sdpa_impl(workload, args.small, device))
    if workload.ort and not args.skip_ort and device == "cpu":  # ORT here runs on the CPU only
        row.impls.append(make_ort(model, inputs, work))
    for name, fuse in zip(HWAWARE, (False, True), strict=True):
        tuning = run_tuning(model, inputs, args.trials, args.db, fuse, args.target)
        row.notes.append(f"{name}: {tuning}")
        row.impls.append(make_hwaware(name, model, inputs, args.db, fuse, args.target))
    fused = row.impls[-1].compiled
    if fused is not None and hasattr(fused, "program"):
        row.flops = sum(k.flops for k in fused.program.kernels.values())
        kernels = [f"{k.name} on {k.impl}" for k in fused.program.kernels.values()
                   if k.family == workload.family]
        kernels += [f"{signature} dissolved: {why}"
                    for signature, why in fused.info.dissolved.items()]
        row.notes.append("fused kernels: " + (", ".join(kernels) or "none found"))
    measure(row.impls, expected, args.repeats)
    return row


# ------------------------------------------------------------------------------ reporting
def _by_name(row: Row, name: str) -> Impl | None:
    return next((i for i in row.impls if i.name == name), None)


def best_peer(row: Row) -> Impl | None:
    """The fastest correct peer (solo median): eager/PyG, Inductor, SDPA, ORT."""
    peers = [i for i in row.impls if i.name not in HWAWARE and i.correct and i.solo_ms]
    return min(peers, key=lambda i: i.solo_ms or float("inf"), default=None)


def _x(num: float | None, den: float | None) -> str:
    return "-" if not num or not den else f"{num / den:.2f}x"


def summary_line(row: Row, peak_gflops: float) -> str:
    unfused, fused = (_by_name(row, n) for n in HWAWARE)
    peer = best_peer(row)
    fused_ms = fused.solo_ms if fused and fused.correct else None
    gflops = row.flops / (fused_ms * 1e6) if fused_ms and row.flops else None
    return (f"| {row.workload.zoo} | {row.workload.family} "
            f"| {_x(unfused.solo_ms if unfused else None, fused_ms)} "
            f"| {peer.name if peer else '-'} {_ms(peer.solo_ms if peer else None)} "
            f"| {_x(peer.solo_ms if peer else None, fused_ms)} "
            f"| {'-' if gflops is None else f'{gflops:.1f}'} "
            f"| {'-' if gflops is None else f'{100 * gflops / peak_gflops:.0f}%'} |")


def _machine(target: Target) -> str:
    if target.kind == "cuda":
        return f"{torch.cuda.get_device_name()} (host: {_cpu_name()}, {CORES} cores)"
    return f"{_cpu_name()}, {CORES} cores"


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    target = get_target(args.target)
    lines = [
        "# hwaware kernel table", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; target {target.name}; machine: "
        f"{_machine(target)}; FP32 peak {target.peak_fp32_gflops:.0f} GFLOP/s "
        f"(targets/{target.name})",
        f"- torch {torch.__version__}, {_versions()}",
        f"- batch 1; {'small' if args.small else 'full'} shapes; medians of {args.repeats} "
        f"calls; tuning budget {args.trials} trials per hwaware variant (db {args.db})"
        + ("; FP32 throughout (cuDNN's TF32 off)" if target.kind == "cuda" else ""), "",
        "## Summary (solo medians)", "",
        "| workload | family | fused vs unfused | best peer (ms) | fused vs best peer "
        "| fused GFLOP/s | % FP32 peak |",
        "|---|---|---:|---|---:|---:|---:|",
        *[summary_line(r, target.peak_fp32_gflops) for r in rows], "",
        "## Every implementation", "",
        "| workload | implementation | interleaved ms | solo ms | vs eager (solo) | correct "
        "| notes |",
        "|---|---|---:|---:|---:|:---:|---|",
    ]
    for r in rows:
        base = r.impls[0].solo_ms
        for i in r.impls:
            lines.append(f"| {r.workload.zoo} | {i.name} | {_ms(i.interleaved_ms)} "
                         f"| {_ms(i.solo_ms)} | {_x(base, i.solo_ms)} | {_mark(i.correct)} "
                         f"| {i.note.replace('|', '/')} |")
    lines += ["", *[f"- {r.workload.zoo}: {n}" for r in rows for n in r.notes]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="host",
                   help="hwaware target; a cuda one runs every implementation on the GPU")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated (valid: {', '.join(WORKLOADS)})")
    p.add_argument("--trials", type=int, default=256, help="tuning budget per hwaware variant")
    p.add_argument("--db", default="tuning_logs/bench-kernels.db")
    p.add_argument("--out", default="bench/results/kernels.md")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--skip-inductor", action="store_true")
    p.add_argument("--skip-ort", action="store_true")
    p.add_argument("--small", action="store_true", help="the zoo's tiny shapes (smoke run)")
    args = p.parse_args(argv)
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS or w not in ZOO]
    if unknown:
        p.error(f"unknown workloads {', '.join(unknown)}; valid: {', '.join(WORKLOADS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if device_of(args.target) == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # every implementation in FP32, as hwaware's
    rows = run_each(args.workloads.split(","), args,
                    lambda name, a, work: bench_workload(WORKLOADS[name], a, work),
                    lambda done: markdown(done, args))
    write_report(markdown(rows, args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
