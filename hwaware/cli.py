"""The `hwaware` command line: a thin layer over the public API.

    hwaware targets [--json]
    hwaware tune MODEL [--target T] [--trials N] [--db PATH] [--rpc HOST:PORT --key K]
                       [--cold-start]
    hwaware compile MODEL --out DIR [--target T] [--trials N] [--db PATH]
    hwaware db stats|export FILE|import FILE... [--db PATH]
    hwaware db merge A B... --out C
    hwaware report DB [--session ID | --target KEY] --out report.html
    hwaware demo [--trials N] [--db PATH]
    hwaware profile [--target T] [--space S] [--samples N] [--threads K] [--split SPLIT]
    hwaware predictor train|eval|adapt [--target T] [--threads K] [--samples N] [--prior P]
                                       [--alone]
    hwaware farm tracker [--host H] [--port P]
    hwaware farm server --key K --tracker HOST:PORT [--host H] [--port P]
    hwaware farm status --tracker HOST:PORT [--json]

MODEL is an ONNX file (`model.onnx`), a model of the built-in zoo (`resnet_basic_block`; see
`hwaware.zoo`), or `package.module:function` naming a function that returns
`(model, example_inputs)`. Heavy imports (torch, tvm) happen only inside the commands.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from hwaware.db import DEFAULT_DB_PATH


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if not args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _interrupted()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if _INTERRUPTED:  # TVM turns a KeyboardInterrupt raised in a callback into its error
            return _interrupted()
        print(f"hwaware: error: {err}", file=sys.stderr)
        return 2


_INTERRUPTED: list[int] = []  # the signals received


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C and SIGTERM end the command through `finally` blocks and exit handlers, so the
    session's records are checkpointed into the .db file (`hwaware.db.close_all`)."""
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def _interrupted() -> int:
    print("hwaware: interrupted; every record measured so far is kept", file=sys.stderr)
    return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hwaware", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("targets", help="list the hardware targets")
    t.add_argument("--json", action="store_true", help="print each target's full description")
    t.set_defaults(func=cmd_targets)

    for name, func, helptext in (("tune", cmd_tune, "run a tuning session"),
                                 ("compile", cmd_compile, "compile and save a model")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("model", help="model.onnx, a zoo model name, or package.module:function")
        c.add_argument("--target", default="host")
        c.add_argument("--trials", type=int, default=200 if name == "tune" else 0)
        c.add_argument("--db", default=str(DEFAULT_DB_PATH))
        c.add_argument("--no-fuse", dest="fuse", action="store_false",
                       help="leave out the fused conv-block, GNN and attention kernels")
        if name == "compile":
            c.add_argument("--out", required=True, help="folder to save the compiled model in")
        else:
            c.add_argument("--rpc", metavar="HOST:PORT", default=None,
                           help="measure on a device farm: its TVM RPC tracker (hwaware farm)")
            c.add_argument("--key", default=None, help="the farm devices' key (with --rpc)")
            c.add_argument("--cold-start", action="store_true",
                           help="start the search's cost model untrained, not from the one "
                           "earlier sessions left for this target (and do not save it)")
        c.set_defaults(func=func)

    d = sub.add_parser("db", help="inspect, move or merge tuning databases",
                       description="import takes other hwaware databases (.db) or JSONL "
                       "exports: every row is checked first, and a bad one (named by file and "
                       "line, or table and rowid) imports nothing; exact duplicates are "
                       "skipped; rows of another TVM version than this install's are "
                       "rejected (named in a warning) and the rest imported. merge writes a "
                       "new database from several.")
    d.add_argument("action", choices=["stats", "export", "import", "merge"])
    d.add_argument("file", nargs="*", help="export: the JSONL file to write; import, merge: "
                   "the databases or JSONL files to read")
    d.add_argument("--db", default=str(DEFAULT_DB_PATH))
    d.add_argument("--out", help="merge: the new database to write")
    d.set_defaults(func=cmd_db)

    m = sub.add_parser("demo", help="tune, compile and time a sample network on this CPU")
    m.add_argument("--model", default="mobilenetv2_block")
    m.add_argument("--trials", type=int, default=None, help="tuning budget (default: the demo's)")
    m.add_argument("--db", default=str(DEFAULT_DB_PATH))
    m.add_argument("--skip-inductor", action="store_true")
    m.set_defaults(func=cmd_demo)
    _add_predictor_commands(sub)
    _add_nas_commands(sub)
    _add_farm_commands(sub)
    _add_report_command(sub)
    return p


def _add_farm_commands(sub: Any) -> None:
    from hwaware.farm import DEFAULT_TRACKER_PORT, LOOPBACK, SECURITY_WARNING

    f = sub.add_parser("farm", help="a device farm over TVM RPC: tracker, servers, status",
                       description="Start a TVM RPC tracker or device server, or list the "
                       f"tracker's devices and queues. WARNING: {SECURITY_WARNING}")
    fsub = f.add_subparsers(dest="farm_command", required=True)
    tr = fsub.add_parser("tracker", help="run a TVM RPC tracker (until killed)",
                         description=f"Run a TVM RPC tracker. {SECURITY_WARNING}")
    tr.add_argument("--host", default=LOOPBACK, help="address to bind (default: loopback only)")
    tr.add_argument("--port", type=int, default=DEFAULT_TRACKER_PORT)
    sv = fsub.add_parser("server", help="serve this machine as a farm device (until killed)",
                         description="Run a TVM RPC server for this machine, registered with "
                         f"the tracker under KEY. WARNING: {SECURITY_WARNING}")
    sv.add_argument("--key", required=True, help="the device key sessions ask for (--key K)")
    sv.add_argument("--tracker", required=True, metavar="HOST:PORT")
    sv.add_argument("--host", default=LOOPBACK, help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=9090, help="first port to try (the next "
                    "free one is taken)")
    st = fsub.add_parser("status", help="list the tracker's devices and queues")
    st.add_argument("--tracker", required=True, metavar="HOST:PORT")
    st.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_farm)


def _add_report_command(sub: Any) -> None:
    r = sub.add_parser("report", help="an HTML report (with PNG charts) of tuning sessions",
                       description="Convergence per task, time per task and phase, model "
                       "speed-ups and the tasks worth more trials, for one session (default: "
                       "the latest) or every session of a target. The PNGs go next to --out.")
    r.add_argument("db", help="the tuning database")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--session", help="the session id (default: the latest session)")
    which.add_argument("--target", help="report every session of this target key")
    r.add_argument("--out", default="report.html", help="the HTML file to write")
    r.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from hwaware.report import write_report

    paths = write_report(args.db, args.out, session=args.session, target=args.target)
    print(f"wrote {paths[0]} and {len(paths) - 1} PNGs beside it")
    return 0


def _add_predictor_commands(sub: Any) -> None:
    from hwaware.predict import COST_MODELS_DIR, DATA_DIR, PRIORS

    pr = sub.add_parser("profile", help="measure sampled architectures for the latency predictor")
    pr.add_argument("--target", default="host")
    pr.add_argument("--space", default="all", help="all, cnn, mobilenet, resnet, transformer, "
                    "gnn, or nas:<space> (a space of `hwaware nas`: nas:ofa-mbv3, ...)")
    pr.add_argument("--samples", type=int, default=100)
    pr.add_argument("--threads", type=int, default=None, help="default: all the target's cores")
    pr.add_argument("--split", choices=["train", "ood", "real"], default="train",
                    help="train: in the spaces' range; ood: beyond it; real: the zoo models")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--repeats", type=int, default=60)
    pr.add_argument("--db", default=str(DEFAULT_DB_PATH))
    pr.add_argument("--out", default=None, help=f"JSONL file (default: {DATA_DIR}/<cpu>.jsonl)")
    pr.set_defaults(func=cmd_profile)

    pd = sub.add_parser("predictor", help="train, evaluate or adapt the latency predictor")
    pd.add_argument("action", choices=["train", "eval", "adapt"])
    pd.add_argument("--target", default="host")
    pd.add_argument("--threads", type=int, default=None)
    pd.add_argument("--device", default=None, help="a device key of the data instead of "
                    "--target/--threads (a device measured on another machine)")
    pd.add_argument("--samples", type=int, default=10, help="adapt: measurements to adapt with")
    pd.add_argument("--base", default=None, help="adapt: the device key to adapt from "
                    "(default: the trained predictor with the most training data)")
    pd.add_argument("--data", default=str(DATA_DIR), help="folder of profile JSONL files")
    pd.add_argument("--models", default=str(COST_MODELS_DIR),
                    help="folder of predictors, one subfolder per device key")
    pd.add_argument("--json", action="store_true", help="eval: print the metrics as JSON")
    pd.add_argument("--alone", action="store_true",
                    help="train: on this device's samples only (default: jointly on every "
                    "device's in the data, each described by its own device's features)")
    pd.add_argument("--prior", choices=PRIORS, default="physical",
                    help="train: the kernel regressor's prior (physical: ratios to FLOPs at "
                    "peak plus bytes at bandwidth; none: times; pretrained: times, boosting on "
                    "from a regressor pretrained on free statistics of unmeasured "
                    "architectures)")
    pd.set_defaults(func=cmd_predictor)


def _add_nas_commands(sub: Any) -> None:
    from hwaware.nas.commands import add_parser

    add_parser(sub)


def cmd_targets(args: argparse.Namespace) -> int:
    from hwaware.target import get_target, list_targets

    for name in list_targets():
        target = get_target(name)
        if args.json:
            print(target.to_json())
            continue
        where = "runs here" if target.can_run_here else "build only"
        print(f"{name:<12} {target.key:<40} {target.peak_fp32_gflops:>9.1f} GFLOP/s  "
              f"{target.mem_bandwidth_gbs:>7.1f} GB/s  {where:<10}  {target.description}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import hwaware
    from hwaware.farm import farm_of

    farm = farm_of(args.rpc, args.key)  # a bad address, or a key alone, fails before any work
    if _is_onnx(args.model):
        from hwaware.onnx_import import tune_onnx

        summary = tune_onnx(Path(args.model), target=args.target, db=args.db, trials=args.trials,
                            show_progress=True, farm=farm, cold_start=args.cold_start)
    else:
        model, inputs = resolve_model(args.model)
        summary = hwaware.tune(model, inputs, target=args.target, trials=args.trials, db=args.db,
                               fuse=args.fuse, rpc=args.rpc, key=args.key,
                               cold_start=args.cold_start)
    print(summary.table())
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import hwaware

    if _is_onnx(args.model):
        compiled = hwaware.compile(args.model, target=args.target, db=args.db, trials=args.trials)
    else:
        model, inputs = resolve_model(args.model)
        compiled = hwaware.compile(model, inputs, target=args.target, db=args.db,
                                   trials=args.trials, fuse=args.fuse)
    out = compiled.save(args.out)
    print(compiled.report())
    print(f"saved to {out}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from hwaware.db import TuningDatabase, merge_databases

    if args.action != "stats" and not args.file:
        raise ValueError(f"'hwaware db {args.action}' needs a FILE argument")
    if args.action == "merge":
        if not args.out:
            raise ValueError("'hwaware db merge' needs --out NEW.db")
        print(_import_report(merge_databases(args.file, args.out), f"merged into {args.out}"))
        return 0
    if args.action == "export" and len(args.file) != 1:
        raise ValueError("'hwaware db export' writes one FILE")
    with TuningDatabase(args.db) as db:
        if args.action == "stats":
            print(json.dumps(db.stats(), indent=1))
        elif args.action == "export":
            print(f"exported {db.export_jsonl(args.file[0])} lines to {args.file[0]}")
        else:
            print(_import_report(db.import_files(args.file), f"imported into {args.db}"))
    return 0


def _import_report(counts: dict[str, int], what: str) -> str:
    from hwaware.db import OTHER_TVM

    added = {k: v for k, v in counts.items() if k not in ("duplicates", OTHER_TVM)}
    tables = ", ".join(f"{n} {table}" for table, n in added.items())
    return (f"{what}: {sum(added.values())} rows ({tables or 'none'}); "
            f"{counts.get('duplicates', 0)} exact duplicates skipped; "
            f"{counts.get(OTHER_TVM, 0)} rows of another TVM version rejected")


def cmd_demo(args: argparse.Namespace) -> int:
    from hwaware.demo import run_demo

    return run_demo(model_name=args.model, trials=args.trials, db_path=args.db,
                    with_inductor=not args.skip_inductor)


def cmd_farm(args: argparse.Namespace) -> int:
    from hwaware import farm

    if args.farm_command == "tracker":
        print(f"TVM RPC tracker on {args.host}:{args.port} (until killed)", file=sys.stderr)
        farm.run_tracker(args.host, args.port)
    elif args.farm_command == "server":
        print(f"TVM RPC server for key {args.key!r} on {args.host}, tracker {args.tracker} "
              "(until killed)", file=sys.stderr)
        farm.run_server(args.key, args.tracker, args.host, args.port)
    else:
        devices = farm.status(args.tracker)
        print(json.dumps(devices, indent=1) if args.json else farm.status_table(devices))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from hwaware.predict import profile, spaces
    from hwaware.predict.features import Device
    from hwaware.target import get_target

    target = get_target(args.target)
    if not target.can_run_here:
        raise ValueError(f"target {args.target} cannot run on this machine: profile it there")
    device = Device.of(target, args.threads)
    if args.split == "real":
        archs = spaces.real_models()
    else:
        archs = spaces.sample(args.space, args.samples, args.seed, ood=args.split == "ood")
    out = Path(args.out) if args.out else profile.data_file()
    from hwaware.db import TuningDatabase

    with TuningDatabase(args.db) as db:
        new = profile.profile(archs, target, device, db, out, args.split, args.repeats)
    print(f"profiled {len(new)} new architectures on {device.key} "
          f"({len(archs) - len(new)} already measured or failed); data in {out}")
    return 0


def cmd_predictor(args: argparse.Namespace) -> int:
    from hwaware.predict import commands

    return commands.run(args)


def resolve_model(spec: str) -> tuple[Any, tuple[Any, ...]]:
    """A zoo name or `package.module:function` -> (model, example_inputs)."""
    if ":" in spec:
        module_name, _, func_name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot load model factory {spec!r}: {err}") from err
        model, inputs = factory()
        return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    from hwaware.zoo import get_model

    return get_model(spec)


def _is_onnx(spec: str) -> bool:
    return spec.endswith(".onnx")


if __name__ == "__main__":
    sys.exit(main())
