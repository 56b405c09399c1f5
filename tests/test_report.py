"""Session reports (`hwaware report`): a real tuning session (`hwaware tune` in a subprocess)
rendered to HTML and PNGs; the convergence data checked against the records in the database,
the model speed-ups against timings the demo stores, a bad session id refused naming the real
ones, and the page rendered in headless Chromium when it is installed."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from hwaware.cli import main
from hwaware.db import TuningDatabase, open_db
from hwaware.report import build_report, write_report
from tests.test_db_reliability import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database holding one real tuning session of `tiny_conv` (4 trials)."""
    path = tmp_path_factory.mktemp("report") / "session.db"
    done = subprocess.run(
        [sys.executable, "-m", "hwaware.cli", "tune", "tests.helpers:tiny_conv", "--trials",
         "4", "--db", str(path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return path


def _sql(path: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, path
    height, width = matplotlib.image.imread(path).shape[:2]  # decodes the whole image
    assert height > 50 and width > 50


def test_report_of_a_real_session_matches_its_records(tuned_db: Path, tmp_path: Path) -> None:
    paths = write_report(tuned_db, tmp_path / "out" / "report.html")
    page = paths[0].read_text()
    assert paths[0].name == "report.html" and len(paths) >= 3  # page, a curve, the time chart
    for png in paths[1:]:
        assert png.parent == paths[0].parent
        assert_valid_png(png)
        assert png.name in page  # the page shows every chart it wrote
    with TuningDatabase(tuned_db, read_only=True) as db:
        report = build_report(db)
        (session_id,) = _sql(tuned_db, "SELECT id FROM sessions")[0]
        assert [s["id"] for s in report.sessions] == [session_id]
        hashes = {h for (h,) in _sql(tuned_db, "SELECT DISTINCT workload_hash FROM records")}
        assert {t.workload_hash for t in report.tasks} == hashes
        for task in report.tasks:
            assert task.name in page
            stored = [us for (us,) in _sql(
                tuned_db, f"SELECT mean_us FROM records WHERE workload_hash = '"
                f"{task.workload_hash}' ORDER BY id")]
            assert task.latencies_us == stored
            curve = [us for us in task.curve_us if us is not None]
            assert curve and all(b <= a for a, b in zip(curve, curve[1:], strict=False))
            tvm_version, target_key = _sql(tuned_db, "SELECT tvm_version, target_key FROM "
                                           "records LIMIT 1")[0]
            best = db.top_records(task.workload_hash, tvm_version, target_key)[0]
            assert curve[-1] == best.mean_us == min(us for us in stored if us is not None)
            assert f"{best.mean_us:.2f}" in page
    # the session recorded where its time went, and the page shows it
    assert report.phases_s["build"] > 0 and report.phases_s["search"] > 0
    assert not report.phases_missing and "unattributed" in page
    assert sum(t.wall_s for t in report.tasks) <= report.elapsed_s + 1e-6
    assert "No whole-model timings" in page  # `hwaware tune` times no whole model


def test_speedups_come_from_the_model_timings_the_demo_stores(tuned_db: Path,
                                                              tmp_path: Path) -> None:
    from hwaware.demo import _store_timings

    db_copy = tmp_path / "with_models.db"
    shutil.copy(tuned_db, db_copy)
    session_id, target_key = _sql(db_copy, "SELECT id, target_key FROM sessions")[0]
    _store_timings(str(db_copy), "tiny_conv", target_key, session_id, {
        "eager": (200.0, 210.0), "torch.compile (Inductor)": (150.0, 150.0),
        "hwaware tuned": (100.0, 104.0)})
    shared = open_db(str(db_copy))
    assert shared is not None
    shared.close()  # the demo's connection: checkpointed, as at its exit
    paths = write_report(db_copy, tmp_path / "models.html", session=session_id)
    page = paths[0].read_text()
    assert "2.00x" in page and "1.50x" in page and "No whole-model timings" not in page
    models_png = [p for p in paths if p.name.endswith("_models.png")]
    assert len(models_png) == 1
    assert_valid_png(models_png[0])


def test_cli_report_a_bad_session_names_the_sessions_there_are(
        tuned_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (session_id,) = _sql(tuned_db, "SELECT id FROM sessions")[0]
    out = tmp_path / "bad.html"
    assert main(["report", str(tuned_db), "--session", "no-such-session", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "no-such-session" in err and session_id in err
    assert main(["report", str(tuned_db), "--target", "no-such-target", "--out", str(out)]) == 2
    assert "no-such-target" in capsys.readouterr().err
    assert not out.exists()


def test_cli_report_renders_in_headless_chromium(tuned_db: Path, tmp_path: Path) -> None:
    (target_key,) = _sql(tuned_db, "SELECT target_key FROM sessions")[0]
    out = tmp_path / "page" / "report.html"
    assert main(["report", str(tuned_db), "--target", target_key, "--out", str(out)]) == 0
    assert out.is_file()
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: the page was written, not rendered")
    shot = tmp_path / "screenshot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}",
                    out.resolve().as_uri()], capture_output=True, timeout=120, check=True)
    assert_valid_png(shot)


def test_tasks_worth_more_trials_are_the_improving_and_the_dominant_ones() -> None:
    from hwaware.report import TaskReport, best_so_far, judge_tasks

    assert best_so_far([None, 30.0, 40.0, 20.0, None, 25.0]) == [None, 30.0, 30.0, 20.0, 20.0,
                                                                 20.0]
    improving = TaskReport("a", "conv_a", "conv2d", ["k0"], [50.0] * 30 + [40.0] * 9 + [20.0])
    converged = TaskReport("b", "conv_b", "conv2d", ["k1"], [9.0] + [10.0] * 99)
    dominant = TaskReport("c", "conv_c", "conv2d", ["k2", "k3"], [90.0] * 100)
    failing = TaskReport("d", "conv_d", "conv2d", ["k4"], [None] * 8)
    tasks = [improving, converged, dominant, failing]
    judge_tasks(tasks)
    assert tasks[0] is dominant  # sorted by share: 2 kernels x 90 us of 209 us
    assert dominant.reasons == ["86% of the tuned kernels' time"]
    assert improving.reasons[0].startswith("still improving: 60% faster")  # 50 -> 20 us
    assert "only 40 trials" in improving.reasons[-1]
    assert converged.reasons == []
    assert failing.reasons and "no candidate ran" in failing.reasons[0]


def test_wall_time_per_task_shares_the_first_round_and_charges_later_batches() -> None:
    from hwaware.report import wall_time_per_task

    def recs(whash: str, n: int, at: float) -> list[dict[str, object]]:
        return [{"workload_hash": whash, "created_at": at, "id": 0}] * n

    # round robin: a (3 candidates) and b (1) committed 40 s after the start; then b, then a
    records = recs("a", 3, 100.0) + recs("b", 1, 100.5) + recs("b", 4, 110.5) + \
        recs("a", 4, 130.5)
    wall = wall_time_per_task(60.0, records)
    assert wall == {"a": 40.5 * 3 / 4 + 20.0, "b": 40.5 / 4 + 10.0}
    assert sum(wall.values()) == 130.5 - 60.0
