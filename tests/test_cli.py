"""The command line: listing targets, database commands, and clear errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hwaware.cli import main


def _hwaware(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hwaware.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_targets_lists_every_target_file() -> None:
    out = _hwaware("targets")
    assert out.returncode == 0
    for name in ("host", "x86-avx512", "arm64-neon", "cuda-sm90"):
        assert name in out.stdout
    assert "build only" in out.stdout  # the CUDA targets here


def test_db_stats_export_import(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "cli.db")
    assert main(["db", "stats", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 0
    export = tmp_path / "out.jsonl"
    assert main(["db", "export", str(export), "--db", db]) == 0
    assert export.exists()
    assert main(["db", "import", str(export), "--db", str(tmp_path / "other.db")]) == 0


def test_bad_input_exits_2_with_a_message(tmp_path: Path, capsys) -> None:  # type: ignore
    assert main(["db", "import", str(tmp_path / "missing.jsonl"), "--db",
                 str(tmp_path / "x.db")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    bad_db = tmp_path / "corrupt.db"
    bad_db.write_bytes(b"garbage" * 50)
    assert main(["db", "stats", "--db", str(bad_db)]) == 2
    assert "corrupt.db" in capsys.readouterr().err
    assert main(["compile", "no_such_zoo_model", "--out", str(tmp_path / "o")]) == 2
    assert "valid names" in capsys.readouterr().err
