"""The Runner: how many calls each timing makes, in which order, and what comes back."""

from __future__ import annotations

from hwaware.runner import LocalRunner, quantile_of, time_interleaved


def _recorders(calls: list[str], names: str) -> list:
    return [lambda n=n: calls.append(n) for n in names]


def test_blocks_of_back_to_back_calls_each_after_an_untimed_one() -> None:
    calls: list[str] = []
    samples = LocalRunner(block=3).run_us(_recorders(calls, "ab"), 6)
    assert [len(s) for s in samples] == [6, 6]
    assert "".join(calls) == "aaaa" "bbbb" "aaaa" "bbbb"
    assert all(t >= 0 for s in samples for t in s)


def test_interleaved_warms_up_then_runs_round_robin() -> None:
    calls: list[str] = []
    medians = time_interleaved(_recorders(calls, "ab"), 4, warmup=2)
    assert len(medians) == 2 and "".join(calls) == "ab" * 6


def test_self_timed_functions_report_their_own_seconds() -> None:
    values = iter([0.5, 2.0, 1.5, 4.0])
    samples = LocalRunner(block=1, untimed_per_block=0, self_timed=True).run_us(
        [lambda: next(values), lambda: next(values)], 2)
    assert samples == [[0.5e6, 1.5e6], [2.0e6, 4.0e6]]


def test_quantile_of() -> None:
    assert quantile_of([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile_of([7.0], 0.25) == 7.0
