"""The conformance report: a Markdown table of `ModelRow`s, failures grouped by cause, and the
raw rows as JSON.

A failure's cause is its first error line with numbers, addresses and the input index taken
out, so that one bug met by ten models is one group with ten members.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from tests.conformance.harness import ENTRY_POINTS, EntryResult, ModelRow
from tests.conformance.observe import first_warning

HEADINGS = {"eager": "eager", "compile": "compile", "save_load": "save/load",
            "torch_compile": "torch.compile", "onnx": "onnx"}
TIMED = ("compile", "torch_compile", "onnx")  # the compile-time column, in this order
COVERED = ("compile", "torch_compile")  # the coverage column


def status_cell(entry: EntryResult | None) -> str:
    """pass, **FAIL**, na, skip; `pass*`: right, with graphs or regions left to eager."""
    if entry is None:
        return "-"
    if entry.status == "pass" and entry.fallbacks:
        return "pass*"
    return "**FAIL**" if entry.status == "fail" else entry.status


def _seconds(entry: EntryResult | None) -> str:
    return "-" if entry is None or entry.seconds is None else f"{entry.seconds:.0f}"


def _coverage(entry: EntryResult | None) -> str:
    return "-" if entry is None or entry.coverage is None else f"{entry.coverage:.0f}"


def _warnings(row: ModelRow) -> str:
    """Count over all entry points, and the first that matters (`observe.first_warning`)."""
    count = sum(e.warnings for e in row.entries.values())
    first = first_warning([e.first_warning for e in row.entries.values() if e.first_warning])
    if not count:
        return "0"
    return f"{count}: {_cell(first, 70)}" if first else str(count)


def _cell(text: str, n: int) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= n else text[: n - 3] + "..."


def table(rows: Sequence[ModelRow]) -> list[str]:
    """One line per model: results per entry point, warnings, compile s, coverage %."""
    heads = [HEADINGS[e] for e in ENTRY_POINTS]
    lines = ["| model | family | " + " | ".join(heads) + " | hwaware warnings | compile s "
             "(compile / torch.compile / onnx) | TVM FLOPs % (compile / torch.compile) |",
             "|" + "---|" * (len(heads) + 5)]
    for r in rows:
        cells = [r.name, r.family, *[status_cell(r.entries.get(e)) for e in ENTRY_POINTS],
                 _warnings(r), " / ".join(_seconds(r.entries.get(e)) for e in TIMED),
                 " / ".join(_coverage(r.entries.get(e)) for e in COVERED)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def totals(rows: Sequence[ModelRow]) -> list[str]:
    """Per entry point: how many models pass, fail, are na or skipped."""
    lines = ["| entry point | pass | fail | na | skip |", "|---|---|---|---|---|"]
    for e in ENTRY_POINTS:
        counts = defaultdict(int)
        for r in rows:
            counts[r.entries[e].status if e in r.entries else "skip"] += 1
        lines.append(f"| {HEADINGS[e]} | {counts['pass']} | {counts['fail']} | "
                     f"{counts['na']} | {counts['skip']} |")
    return lines


def cause(entry: EntryResult) -> str:
    """The group key of a failure: its first error line with paths, qualified class names,
    numbers, addresses and input indices taken out (ATen op names, all lower case, stay), and
    the Relax op TVM names as the offending call, if any."""
    op = re.search(r"Offending call: (R\.\w+)", entry.detail)
    text = normalized(re.sub(r"^input \d+: ", "", entry.error))
    return f"[{op.group(1)}] {text}" if op else text


def normalized(text: str, n: int = 110) -> str:
    """`text` with paths, qualified class names, addresses and numbers replaced by
    placeholders, cut to `n` characters: one key for one kind of message."""
    text = re.sub(r"[\w.+-]*(/[\w.+-]+)+", "PATH", text)
    text = re.sub(r"\b([a-z_]\w*\.)+[A-Z]\w*", "CLASS", text)  # transformers....ModelOutput
    text = re.sub(r"0x[0-9a-fA-F]+", "ADDR", text)
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)[:n]


def failure_groups(rows: Sequence[ModelRow], status: str = "fail"
                   ) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Failures grouped by cause, largest group first: (cause, [(model, entry, error)])."""
    groups: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for r in rows:
        for e in ENTRY_POINTS:
            entry = r.entries.get(e)
            if entry is not None and entry.status == status:
                groups[cause(entry)].append((r.name, HEADINGS[e], entry.detail or entry.error))
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def grouped(rows: Sequence[ModelRow], status: str) -> list[str]:
    lines = []
    for key, members in failure_groups(rows, status):
        who = ", ".join(f"{m} ({e})" for m, e, _ in members)
        lines += [f"- **{len(members)}x** `{_cell(key, 110)}`", f"  - {who}",
                  f"  - e.g. {members[0][0]} ({members[0][1]}): `{_cell(members[0][2], 600)}`"]
    return lines or ["none"]


def warning_kinds(rows: Sequence[ModelRow]) -> list[str]:
    """hwaware's warnings, grouped by kind over the corpus, most widespread first."""
    models: dict[str, set[str]] = defaultdict(set)
    example: dict[str, str] = {}
    for r in rows:
        for entry in r.entries.values():
            for text in entry.warning_texts:
                key = normalized(text, 90)
                models[key].add(r.name)
                example.setdefault(key, text)
    order = sorted(models, key=lambda k: (-len(models[k]), k))
    return [f"- **{len(models[k])} models** `{_cell(example[k], 240)}` "
            f"({', '.join(sorted(models[k]))})" for k in order] or ["none"]


def details(rows: Sequence[ModelRow]) -> list[str]:
    """Per model, the notes and errors of every entry point (what the table abbreviates)."""
    lines = []
    for r in rows:
        lines.append(f"- **{r.name}** ({r.source}, {r.eager_flops} FLOPs per forward, "
                     f"{r.wall_s:.0f} s)")
        for e in ENTRY_POINTS:
            entry = r.entries.get(e)
            if entry is None:
                continue
            error = _cell(entry.detail, 400) if entry.detail else entry.error
            text = "; ".join(t for t in (error, entry.notes,
                                         f"first warning: {entry.first_warning}"
                                         if entry.first_warning else "") if t)
            lines.append(f"  - {HEADINGS[e]}: {entry.status}" + (f" - {text}" if text else ""))
        texts = dict.fromkeys(t for e in r.entries.values() for t in e.warning_texts)
        lines += [f"  - warning: {_cell(t, 300)}" for t in list(texts)[:6]]
    return lines


def markdown(rows: Sequence[ModelRow], meta: dict[str, Any]) -> str:
    """The whole report."""
    head = [f"# hwaware conformance: {meta.get('cpu', '')}", ""]
    head += [f"- {k}: {v}" for k, v in meta.items()]
    parts = [head, ["", "## Results", ""], table(rows), [""], totals(rows),
             ["", "`pass*`: the outputs match, but hwaware left graphs (torch.compile) or "
              "regions (a dynamic model) to eager PyTorch: see the warnings and the coverage.",
              "", "## Failures by cause", ""], grouped(rows, "fail"),
             ["", "## Not applicable (torch's exporter)", ""], grouped(rows, "na"),
             ["", "## hwaware's warnings by kind", ""], warning_kinds(rows),
             ["", "## Per model", ""], details(rows)]
    return "\n".join(line for part in parts for line in part) + "\n"


def to_json(rows: Sequence[ModelRow], meta: dict[str, Any]) -> str:
    return json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1)


def from_json(text: str) -> tuple[list[ModelRow], dict[str, Any]]:
    doc = json.loads(text)
    return [ModelRow.from_dict(r) for r in doc["rows"]], doc["meta"]
