"""Fused attention across head dims: hwaware against eager, Inductor and SDPA, in one run.

Per head dim (one attention core softmax(q k^T / sqrt(d)) v on per-head q, k, v of
[1, heads, seq, head dim], written out as models write it, `hwaware.predict.spaces`' "attention"
block): eager PyTorch, torch.compile (Inductor), `F.scaled_dot_product_attention` (PyTorch's
fused kernel) and `hwaware.compile` untuned (trials=0, no database: what a new user gets; the
build runs the kernel on TVM or PyTorch, whichever it timed faster, and the notes say which).
Head dims that 32 does not divide are where the kernel's head-dim tile matters (session 32).

Every output is checked against eager; timings are medians of `--repeats` calls, interleaved
(round robin), in milliseconds; ratios are eager's time over each implementation's.

    python bench/attention_head_dims.py [--causal] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from run import (  # noqa: E402
    CORES,
    Impl,
    _cpu_name,
    _ms,
    _ratio,
    _versions,
    make_eager,
    make_hwaware,
    make_inductor,
    measure,
    write_report,
)

from hwaware.predict.profile import cpu_kind  # noqa: E402
from hwaware.predict.spaces import Architecture  # noqa: E402

HEAD_DIMS = (12, 16, 20, 24, 32, 36, 48, 60, 64, 80, 96, 128)


def sdpa(causal: bool, inputs: tuple[torch.Tensor, ...]) -> Impl:
    q, k, v = inputs
    return Impl("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal))


def row(head_dim: int, args: argparse.Namespace) -> str:
    arch = Architecture("block", {"block": "attention", "heads": args.heads, "seq": args.seq,
                                  "head_dim": head_dim, "causal": args.causal})
    model, inputs = arch.build()
    with torch.no_grad():
        expected = model(*inputs)
    impls = [make_eager(model, inputs), make_inductor(model, inputs), sdpa(args.causal, inputs),
             make_hwaware("hwaware", model, inputs, db=None)]
    measure(impls, expected, args.repeats)
    eager = impls[0].interleaved_ms
    cells = [_ms(i.interleaved_ms) + ("" if i.correct else " **wrong**") for i in impls]
    ratios = [_ratio(eager, i.interleaved_ms) for i in impls[1:]]
    flops = 4 * args.heads * args.seq * args.seq * head_dim / (2 if args.causal else 1)
    best = impls[-1].interleaved_ms
    gflops = f"{flops / best / 1e6:.0f}" if best else "-"
    return f"| {head_dim} | {' | '.join(cells)} | {' | '.join(ratios)} | {gflops} | " \
           f"{impls[-1].note} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default="", help="default: bench/attention-head-dims-<cpu>.md")
    args = parser.parse_args()
    torch.set_num_threads(CORES)
    rows = [row(int(d), args) for d in args.head_dims.split(",")]
    text = "\n".join([
        f"# Fused attention across head dims ({_cpu_name()}, {CORES} threads)", "",
        f"- {_versions()}; batch 1, {args.heads} heads, sequence {args.seq}"
        f"{', causal' if args.causal else ''}; medians of {args.repeats} interleaved calls, ms",
        f"- command: python bench/attention_head_dims.py {' '.join(sys.argv[1:])}", "",
        "| head dim | eager | inductor | sdpa | hwaware | inductor vs eager | sdpa vs eager | "
        "hwaware vs eager | hwaware GFLOP/s | hwaware's build |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|", *rows, ""])
    write_report(text, args.out or str(Path(__file__).parent
                                       / f"attention-head-dims-{cpu_kind()}.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
