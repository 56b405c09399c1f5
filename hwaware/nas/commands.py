"""`hwaware nas spaces|search|space`: the architecture search's command-line half."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hwaware.db import DEFAULT_DB_PATH


def add_parser(sub: Any) -> None:
    """The `nas` command and its actions on the CLI's subparsers."""
    n = sub.add_parser("nas", help="architecture search: spaces, latency-constrained search")
    actions = n.add_subparsers(dest="nas_action", required=True)
    s = actions.add_parser("spaces", help="list the search spaces and their genes")
    s.set_defaults(func=cmd_spaces)
    r = actions.add_parser("search", help="NSGA-II over (objective, latency on the target)")
    r.add_argument("--space", default="ofa-mbv3", help="a shipped space or a space .json file")
    r.add_argument("--target", default="host")
    r.add_argument("--threads", type=int, default=None, help="default: all the target's cores")
    r.add_argument("--latency-ms", type=float, default=None, help="hard latency limit")
    r.add_argument("--max-params", type=int, default=None, help="hard parameter-count limit")
    r.add_argument("--objective", default="params", choices=["params", "synflow"],
                   help="what to maximise beside latency (Python: any callable arch -> float)")
    r.add_argument("--evals", type=int, default=1000)
    r.add_argument("--population", type=int, default=50)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--db", default=str(DEFAULT_DB_PATH),
                   help="tuning database: measured kernel times where it has them")
    r.add_argument("--measure-every", type=int, default=None, metavar="K",
                   help="LINAS: every K generations compile and time the front's best, "
                   "store them and refit the predictor")
    r.add_argument("--measure-top", type=int, default=4, help="LINAS: models measured each time")
    r.add_argument("--predictor", default=None, help="folder of a saved latency predictor "
                   "(default: the one in cost_models/ for the target and threads)")
    r.add_argument("--out", default="nas_out", help="folder for the front (CSV, JSON, PNG) "
                   "and the archive a rerun resumes from")
    r.set_defaults(func=cmd_search)
    d = actions.add_parser("space", help="a device-specific space: drop the choices this "
                           "device runs far below the best choice's share of its roofline")
    d.add_argument("--space", default="ofa-mbv3")
    d.add_argument("--target", default="host")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--samples", type=int, default=300, help="architectures to read blocks of")
    d.add_argument("--keep", type=float, default=0.6,
                   help="a choice stays when its roofline share is at least this times the "
                   "best choice's")
    d.add_argument("--db", default=str(DEFAULT_DB_PATH))
    d.add_argument("--predictor", default=None, help="folder of a saved latency predictor")
    d.add_argument("--out", default=None, help="the new space file (default: "
                   "<space>@<device key>.json here)")
    d.set_defaults(func=cmd_space)


def cmd_spaces(args: argparse.Namespace) -> int:
    from hwaware.nas import get_space, space_names

    for name in space_names():
        space = get_space(name)
        genes = ", ".join(f"{k}[{len(v)}]" if v[0].index is not None else k
                          for k, v in space.groups.items())
        print(f"{name:12} {space.size:9.3g} architectures  genes: {genes}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from hwaware.nas import search

    result = search(args.space, args.target, objective=args.objective,
                    latency_ms=args.latency_ms, max_params=args.max_params, evals=args.evals,
                    population=args.population, seed=args.seed, db=args.db,
                    threads=args.threads, predictor=args.predictor, out_dir=args.out,
                    progress=args.verbose, measure_every=args.measure_every,
                    measure_top=args.measure_top)
    if not result.met_limit:
        print("no architecture met the limits; the fastest found:")
    print(f"{'latency_ms':>10}  {result.objective:>12}  source     arch")
    for p in result.front:
        print(f"{p.latency_ms:10.3f}  {p.objective:12.4g}  {p.source:9}  "
              f"{json.dumps(p.arch, sort_keys=True)}")
    print(f"{len(result.evaluated)} architectures evaluated; front: "
          + ", ".join(str(f) for f in result.files.values()))
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from hwaware.nas import LatencyTable, get_space
    from hwaware.nas.specialize import specialize

    table = LatencyTable(args.target, args.db, space=get_space(args.space),
                         threads=args.threads, predictor=args.predictor)
    result = specialize(table.space, table, samples=args.samples, keep=args.keep)
    print(result.table())
    out = result.write(args.out or f"{table.space.name}@{table.predictor.key}.json")
    print(f"space written to {out} (use it as --space {out})")
    return 0
