"""Session reports: what a tuning session did, as one HTML page with PNG charts beside it.

Goes in: a tuning database and a session id (default: the latest session), or a target key
(every session on that target). Comes out: `report.html` (any name) and PNGs next to it
(`<stem>_*.png`): per task the convergence curve (best latency so far vs trials, from the
records in the order they were committed), the wall time per task (the gaps between record
commits, each charged to the task whose batch was committed), where the time went (search /
build / run / cost model / database, from MetaSchedule's profiler, stored in the session summary
by `hwaware.tune`), the tuned model's speed-up over eager and Inductor (model measurements tied
to the session, which `hwaware demo` writes), and the tasks worth more trials.

What the database does not hold is said on the page, not guessed: sessions tuned before the
phase split was recorded, or unfinished ones, have no phases; a session without model timings
has no speed-ups.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwaware.db import DbArg, TuningDatabase

IMPROVING_TAIL = 0.25  # a task whose best improved in this last share of its trials ...
IMPROVING_MIN = 0.01  # ... by more than this fraction is still improving
LARGE_SHARE = 0.30  # a task with this share of the tuned kernels' time is worth trials
BATCH_GAP_S = 1.0  # records of one workload committed closer than this are one batch
FEW_TRIALS = 64  # fewer trials than this per task: MetaSchedule's cost model has little data
IMPL_LABELS = {"eager": "eager PyTorch", "inductor": "torch.compile (Inductor)",
               "hwaware-untuned": "hwaware untuned", "hwaware": "hwaware tuned"}


@dataclass
class TaskReport:
    """One tuned workload in the selected sessions: its trials, convergence and time."""

    workload_hash: str
    name: str
    family: str
    kernels: list[str]
    latencies_us: list[float | None] = field(default_factory=list)  # per trial; None: failed
    prior_best_us: float | None = None  # the best before these sessions (resumed tuning)
    wall_s: float = 0.0
    share: float | None = None  # of the tuned kernels' time per model run
    reasons: list[str] = field(default_factory=list)  # why more trials are worth it

    @property
    def trials(self) -> int:
        return len(self.latencies_us)

    @property
    def failed(self) -> int:
        return sum(us is None for us in self.latencies_us)

    @property
    def curve_us(self) -> list[float | None]:
        return best_so_far(self.latencies_us)

    @property
    def best_us(self) -> float | None:
        return self.curve_us[-1] if self.latencies_us else None


@dataclass
class Report:
    """Everything the page shows, read from the database."""

    db_path: str
    sessions: list[dict[str, Any]]
    tasks: list[TaskReport]
    phases_s: dict[str, float]  # summed over the sessions that recorded them
    phases_missing: list[str]  # sessions without a recorded phase split
    models: list[dict[str, Any]]  # latest model timing per (model, impl)

    @property
    def elapsed_s(self) -> float:
        return sum((s["finished_at"] or s["last_record_at"] or s["started_at"])
                   - s["started_at"] for s in self.sessions)


def best_so_far(latencies_us: list[float | None]) -> list[float | None]:
    """The best latency after each trial (None until one succeeds): never increases."""
    out: list[float | None] = []
    best: float | None = None
    for us in latencies_us:
        if us is not None and (best is None or us < best):
            best = us
        out.append(best)
    return out


# ------------------------------------------------------------------ reading the database
def select_sessions(db: TuningDatabase, session: str | None = None, target: str | None = None
                    ) -> list[dict[str, Any]]:
    """The sessions to report on: one by id, every one of a target, or the latest. Raises
    ValueError naming the sessions (or targets) there are when the choice matches none."""
    rows = _query(db, "SELECT * FROM sessions ORDER BY started_at DESC")
    if not rows:
        raise ValueError(f"{db.path}: no tuning sessions in this database")
    if session is not None:
        chosen = [r for r in rows if r["id"] == session]
        if not chosen:
            raise ValueError(f"{db.path}: no session {session!r}; the sessions are (newest "
                             f"first): {_session_list(rows)}")
    elif target is not None:
        chosen = [r for r in rows if r["target_key"] == target]
        if not chosen:
            targets = sorted({r["target_key"] for r in rows})
            raise ValueError(f"{db.path}: no sessions on target {target!r}; targets with "
                             f"sessions: {', '.join(targets)}")
    else:
        chosen = rows[:1]
    return [_with_last_record(db, dict(r)) for r in reversed(chosen)]


def _session_list(rows: list[dict[str, Any]], limit: int = 20) -> str:
    shown = ", ".join(f"{r['id']} ({r['model'] or 'model'} on {r['target_key']})"
                      for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _with_last_record(db: TuningDatabase, session: dict[str, Any]) -> dict[str, Any]:
    last = db.db.execute("SELECT MAX(created_at) FROM records WHERE session_id = ?",
                         [session["id"]]).fetchone()[0]
    session["last_record_at"] = last
    session["summary"] = json.loads(session["summary_json"]) if session["summary_json"] else {}
    return session


def _query(db: TuningDatabase, sql: str, args: list[Any] | None = None) -> list[dict[str, Any]]:
    cursor = db.db.execute(sql, args or [])
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def read_tasks(db: TuningDatabase, sessions: list[dict[str, Any]]) -> list[TaskReport]:
    """Every workload the sessions measured, its trials in commit order and its wall time."""
    tasks: dict[str, TaskReport] = {}
    for session in sessions:
        records = _query(db, "SELECT * FROM records WHERE session_id = ? ORDER BY id",
                         [session["id"]])
        for rec in records:
            if rec["workload_hash"] not in tasks:
                tasks[rec["workload_hash"]] = _new_task(db, rec, sessions)
            tasks[rec["workload_hash"]].latencies_us.append(rec["mean_us"])
        for whash, secs in wall_time_per_task(session["started_at"], records).items():
            tasks[whash].wall_s += secs
    return list(tasks.values())


def wall_time_per_task(started_at: float, records: list[dict[str, Any]]) -> dict[str, float]:
    """A session's wall time per workload, from its record commits. A batch (the records of one
    workload committed together, less than BATCH_GAP_S apart) is charged the time since the
    previous batch's commit. The first round is shared out by candidates instead: MetaSchedule
    searches, builds and starts running a batch of every task before it commits any, so its
    commits say nothing per task."""
    batches: list[list[Any]] = []  # [workload, candidates, commit time]
    for rec in sorted(records, key=lambda r: (r["created_at"], r["id"])):
        if batches and batches[-1][0] == rec["workload_hash"] and \
                rec["created_at"] - batches[-1][2] < BATCH_GAP_S:
            batches[-1][1:] = [batches[-1][1] + 1, rec["created_at"]]
        else:
            batches.append([rec["workload_hash"], 1, rec["created_at"]])
    first = 0
    while first < len(batches) and batches[first][0] not in {b[0] for b in batches[:first]}:
        first += 1
    out: dict[str, float] = {}
    if first:
        round_s = max(0.0, batches[first - 1][2] - started_at)
        candidates = sum(b[1] for b in batches[:first])
        for whash, n, _ in batches[:first]:
            out[whash] = round_s * n / candidates
    for (_, _, before), (whash, _, at) in zip(batches[first - 1:], batches[first:],
                                              strict=False):
        out[whash] = out.get(whash, 0.0) + max(0.0, at - before)
    return out


def _new_task(db: TuningDatabase, rec: dict[str, Any], sessions: list[dict[str, Any]]
              ) -> TaskReport:
    whash = rec["workload_hash"]
    meta = _task_meta(db, whash, sessions)
    prior = db.db.execute(
        "SELECT MIN(mean_us) FROM records WHERE workload_hash = ? AND target_key = ? AND "
        "tvm_version = ? AND id < ?",
        [whash, rec["target_key"], rec["tvm_version"], rec["id"]]).fetchone()[0]
    return TaskReport(whash, meta.get("name") or f"{meta.get('family') or 'workload'}_"
                      f"{whash[:10]}", meta.get("family") or "?", list(meta.get("kernels", [])),
                      prior_best_us=prior)


def _task_meta(db: TuningDatabase, whash: str, sessions: list[dict[str, Any]]
               ) -> dict[str, Any]:
    """A task's name, family and kernels: from a session summary, else the kernel schema."""
    for session in sessions:
        for task in session["summary"].get("tasks", []):
            if task.get("workload_hash") == whash:
                return dict(task)
    rows = db.db.execute(
        "SELECT k.family, kw.signature FROM kernel_workloads kw LEFT JOIN kernels k "
        "ON k.signature = kw.signature WHERE kw.workload_hash = ?", [whash]).fetchall()
    return {"family": rows[0][0] if rows else "", "kernels": [r[1] for r in rows]}


def read_models(db: TuningDatabase, sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest whole-model timing per (model, impl) tied to the sessions."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for session in sessions:
        for row in _query(db, "SELECT * FROM model_measurements WHERE session_id = ? "
                          "ORDER BY created_at, id", [session["id"]]):
            latest[(row["model"], row["impl"])] = row
    return list(latest.values())


def read_phases(sessions: list[dict[str, Any]]) -> tuple[dict[str, float], list[str]]:
    """Seconds per phase summed over the sessions, and the sessions that recorded none."""
    total: dict[str, float] = {}
    missing = []
    for session in sessions:
        phases = session["summary"].get("phases_s")
        if not phases:
            missing.append(session["id"])
            continue
        for phase, secs in phases.items():
            total[phase] = total.get(phase, 0.0) + float(secs)
    return total, missing


def judge_tasks(tasks: list[TaskReport]) -> None:
    """Fill in each task's share of the tuned time and the reasons to give it more trials."""
    weights = {t.workload_hash: (t.best_us or 0.0) * max(1, len(t.kernels)) for t in tasks}
    total = sum(weights.values())
    for t in tasks:
        t.share = weights[t.workload_hash] / total if total > 0 else None
        t.reasons = _reasons(t)
    tasks.sort(key=lambda t: -(t.share or 0.0))


def _reasons(t: TaskReport) -> list[str]:
    if t.best_us is None:
        return [f"no candidate ran successfully in {t.trials} trials"]
    reasons = []
    tail_start = max(0, math.ceil(t.trials * (1 - IMPROVING_TAIL)) - 1)
    before_tail = t.curve_us[tail_start] if tail_start > 0 else None
    if before_tail is not None and before_tail > t.best_us * (1 + IMPROVING_MIN):
        reasons.append(f"still improving: {100 * (1 - t.best_us / before_tail):.0f}% faster in "
                       f"the last {100 * IMPROVING_TAIL:.0f}% of its trials")
    if t.share is not None and t.share >= LARGE_SHARE:
        reasons.append(f"{100 * t.share:.0f}% of the tuned kernels' time")
    if reasons and t.trials < FEW_TRIALS:
        reasons.append(f"only {t.trials} trials (MetaSchedule's cost model learns from "
                       f"~{FEW_TRIALS}+)")
    return reasons


def build_report(db: TuningDatabase, session: str | None = None, target: str | None = None
                 ) -> Report:
    """Everything the page shows, read from `db`."""
    sessions = select_sessions(db, session, target)
    tasks = read_tasks(db, sessions)
    judge_tasks(tasks)
    phases, missing = read_phases(sessions)
    return Report(str(db.path), sessions, tasks, phases, missing, read_models(db, sessions))


# --------------------------------------------------------------------------- charts
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_convergence(task: TaskReport, path: Path) -> Path:
    """Each trial's latency (dots; failed ones as x at the top) and the best so far (steps)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.0), dpi=100)
    trials = list(range(1, task.trials + 1))
    ok = [(i, us) for i, us in zip(trials, task.latencies_us, strict=True) if us is not None]
    if ok:
        ax.scatter(*zip(*ok, strict=True), s=10, color="#9ab", label="trial")
        curve = [(i, us) for i, us in zip(trials, task.curve_us, strict=True) if us is not None]
        ax.step(*zip(*curve, strict=True), where="post", color="#c33", label="best so far")
    failed = [i for i, us in zip(trials, task.latencies_us, strict=True) if us is None]
    if failed:
        top = max((us for _, us in ok), default=1.0)
        ax.scatter(failed, [top] * len(failed), marker="x", color="#888", label="failed")
    if task.prior_best_us is not None:
        ax.axhline(task.prior_best_us, ls="--", color="#383", label="best before")
    ax.set(xlabel="trial", ylabel="latency (us)", title=task.name)
    if ok and max(us for _, us in ok) > 10 * min(us for _, us in ok):
        ax.set_yscale("log")  # a few slow candidates would flatten the curve
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_time(report: Report, path: Path) -> Path:
    """Wall time per task (left) and per phase (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 0.4 * len(report.tasks) + 2.2),
                                      dpi=100)
    left.barh([t.name for t in report.tasks], [t.wall_s for t in report.tasks], color="#47a")
    left.set(xlabel="seconds", title="time per task (between record commits)")
    left.invert_yaxis()
    phases = {**report.phases_s, "unattributed": _unattributed(report)}
    if report.phases_s:
        right.barh(list(phases), list(phases.values()), color="#a74")
        right.invert_yaxis()
    else:
        right.text(0.5, 0.5, "no phase split recorded", ha="center", va="center")
    right.set(xlabel="seconds", title="where the time went")
    return _save(fig, path)


def _unattributed(report: Report) -> float:
    """Session time in no phase (Python glue, task setup, collecting runner results)."""
    recorded = [s for s in report.sessions if s["id"] not in report.phases_missing]
    elapsed = sum(s["summary"].get("elapsed_s", 0.0) for s in recorded)
    return max(0.0, elapsed - sum(report.phases_s.values()))


def plot_models(report: Report, path: Path) -> Path:
    """Model latency per implementation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 0.45 * len(report.models) + 1.6), dpi=100)
    labels = [f"{m['model']}: {IMPL_LABELS.get(m['impl'], m['impl'])}" for m in report.models]
    ax.barh(labels, [m["latency_us"] / 1e3 for m in report.models], color="#5a5")
    ax.invert_yaxis()
    ax.set(xlabel="latency (ms, lower is better)", title="whole model")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    _pyplot().close(fig)
    return path


# --------------------------------------------------------------------------- the page
def write_report(db: DbArg, out: str | Path, session: str | None = None,
                 target: str | None = None) -> list[Path]:
    """Write the report of one session (default: the latest) or of every session of `target`
    to `out` (HTML) and PNGs beside it; returns their paths, the HTML first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if db is None:
        raise ValueError("a report needs a database (db=None was given)")
    if isinstance(db, TuningDatabase):
        report = build_report(db, session, target)
    else:  # read-only: a report never changes the file
        with TuningDatabase(db, read_only=True) as opened:
            report = build_report(opened, session, target)
    pngs = _write_charts(report, out)
    out.write_text(render_html(report, {k: p.name for k, p in pngs.items()}), encoding="utf-8")
    return [out, *pngs.values()]


def _write_charts(report: Report, out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    pngs = {f"task:{t.workload_hash}": plot_convergence(
        t, Path(f"{stem}_task{i}_{_safe(t.name)}.png")) for i, t in enumerate(report.tasks)}
    if report.tasks:
        pngs["time"] = plot_time(report, Path(f"{stem}_time.png"))
    if report.models:
        pngs["models"] = plot_models(report, Path(f"{stem}_models.png"))
    return pngs


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]


CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}th{background:#eee}.num{text-align:right}.note{color:#555;font-size:90%}
.tasks{display:flex;flex-wrap:wrap;gap:8px}figure{margin:4px}"""


def render_html(report: Report, images: dict[str, str]) -> str:
    """The page: sessions, model speed-ups, tasks worth more trials, time, convergence."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hwaware tuning "
             f"report</title><style>{CSS}</style></head><body>",
             f"<h1>hwaware tuning report</h1><p class='note'>database {_e(report.db_path)}</p>",
             _sessions_html(report), _models_html(report, images.get("models")),
             _worth_html(report), _tasks_html(report), _time_html(report, images.get("time")),
             _convergence_html(report, images), "</body></html>"]
    return "\n".join(parts)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _when(ts: float | None) -> str:
    import datetime

    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _sessions_html(report: Report) -> str:
    rows = [[s["id"], s["model"] or "-", s["target_key"], s["device"], s["trials"],
             _when(s["started_at"]), _when(s["finished_at"]) if s["finished_at"] else
             "unfinished"] for s in report.sessions]
    trials = sum(t.trials for t in report.tasks)
    failed = sum(t.failed for t in report.tasks)
    worth = sum(bool(t.reasons) for t in report.tasks)
    headline = (f"<p><b>{trials} trials</b> measured over <b>{len(report.tasks)} tasks</b> "
                f"({failed} failed) in {report.elapsed_s:.0f} s; {worth} task(s) worth more "
                f"trials.</p>")
    return headline + "<h2>Sessions</h2>" + _table(
        ["session", "model", "target", "device", "trials asked", "started", "finished"], rows)


def _models_html(report: Report, image: str | None) -> str:
    head = "<h2>Whole model: speed-up</h2>"
    if not report.models:
        return head + ("<p>No whole-model timings in the database for these sessions, so no "
                       "speed-up over eager or Inductor: <code>hwaware tune</code> times kernels "
                       "only; <code>hwaware demo</code> times eager, Inductor and hwaware and "
                       "records them with its session.</p>")
    rows = []
    for model in sorted({m["model"] for m in report.models}):
        by_impl = {m["impl"]: m for m in report.models if m["model"] == model}
        tuned = by_impl.get("hwaware")
        for impl, m in by_impl.items():
            speedup = f"{m['latency_us'] / tuned['latency_us']:.2f}x" if tuned and \
                impl != "hwaware" else "-"
            rows.append([model, IMPL_LABELS.get(impl, impl), f"{m['latency_us'] / 1e3:.3f}",
                         f"{m['spread_us'] / 1e3:.3f}", speedup])
    img = f"<img src='{_e(image)}' alt='model latency'>" if image else ""
    return head + _table(["model", "implementation", "ms", "spread ms",
                          "hwaware tuned is faster by"], rows) + img


def _worth_html(report: Report) -> str:
    worth = [t for t in report.tasks if t.reasons]
    head = "<h2>Tasks worth more trials</h2>"
    if not worth:
        return head + "<p>None: every task has converged and none dominates the time.</p>"
    items = "".join(f"<li><b>{_e(t.name)}</b>: {_e('; '.join(t.reasons))}</li>" for t in worth)
    return head + f"<ul>{items}</ul>"


def _tasks_html(report: Report) -> str:
    rows = [[t.name, t.family, len(t.kernels), t.trials, t.failed,
             "-" if t.best_us is None else f"{t.best_us:.2f}",
             "-" if t.prior_best_us is None else f"{t.prior_best_us:.2f}",
             "-" if t.share is None else f"{100 * t.share:.0f}%", f"{t.wall_s:.1f}"]
            for t in report.tasks]
    return "<h2>Tasks</h2>" + _table(
        ["task", "family", "kernels", "trials", "failed", "best us", "best before us",
         "share of tuned time", "wall s"], rows) + (
        "<p class='note'>Share: the task's best latency times the kernels that call it, over "
        "the sum for all tasks (kernels not tuned, e.g. element-wise ones, are not counted). "
        "Latencies are MetaSchedule's runner means; the best few of a fused kernel are "
        "re-measured at the end of the session and stored in place.</p>")


def _time_html(report: Report, image: str | None) -> str:
    head = (f"<h2>Time</h2><p>{report.elapsed_s:.1f} s from session start to its last record "
            f"or finish. Time per task: the gaps between record commits, each charged to the "
            f"task whose batch was committed (search, build and run of that batch); the first "
            f"round, where MetaSchedule prepares a batch of every task before committing any, "
            f"is shared out by candidates.</p>")
    if report.phases_s:
        rows = [[k, f"{v:.1f}"] for k, v in report.phases_s.items()]
        rows.append(["unattributed", f"{_unattributed(report):.1f}"])
        head += _table(["phase", "seconds"], rows) + (
            "<p class='note'>Phases from MetaSchedule's profiler (summed over all tasks; not "
            "split per task): search = evolutionary search and cost-model scoring, build = "
            "compiling candidates, run = sending them to the runner and waiting, cost_model = "
            "refitting XGBoost, database = committing records, remeasure = timing the best "
            "records again. Unattributed: task setup, Python-side glue and collecting runner "
            "results, which no profiler scope covers.</p>")
    if report.phases_missing:
        head += (f"<p>No phase split recorded for session(s) "
                 f"{_e(', '.join(report.phases_missing))} (unfinished, or tuned by an hwaware "
                 f"that did not record it).</p>")
    return head + (f"<img src='{_e(image)}' alt='time per task and phase'>" if image else "")


def _convergence_html(report: Report, images: dict[str, str]) -> str:
    figs = "".join(f"<figure><img src='{_e(images[f'task:{t.workload_hash}'])}' "
                   f"alt='convergence of {_e(t.name)}'><figcaption>{_e(t.name)}: best "
                   f"{'-' if t.best_us is None else f'{t.best_us:.2f} us'} after {t.trials} "
                   f"trials</figcaption></figure>" for t in report.tasks)
    return "<h2>Convergence: best latency vs trials</h2><div class='tasks'>" + figs + "</div>"
