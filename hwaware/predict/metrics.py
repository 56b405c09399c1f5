"""Accuracy figures of latency predictions, as nn-Meter, HELP and the issue report them.

Goes in: predicted and measured latencies (any unit, the same for both). Comes out: a
`Metrics` record: the share within ±10% and ±5% of the measurement, MAPE, RMSE, Spearman's ρ and
Kendall's τ (rank agreement: what an architecture search needs), and the count. `noise_floor`
gives the same figures for two measurements of one compiled model, so that measurement noise is
never mistaken for model error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Metrics:
    n: int
    within_10: float  # share of predictions within ±10% of the measurement
    within_5: float
    mape: float  # mean absolute percentage error, in percent
    rmse: float  # in the unit of the inputs
    spearman: float
    kendall: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    def row(self, name: str) -> str:
        """A markdown table row (see `TABLE_HEADER`)."""
        return (f"| {name} | {self.n} | {100 * self.within_10:.1f}% | {100 * self.within_5:.1f}% "
                f"| {self.mape:.1f}% | {self.rmse:.1f} | {self.spearman:.3f} | "
                f"{self.kendall:.3f} |")


TABLE_HEADER = ("| split | n | ±10% | ±5% | MAPE | RMSE (us) | Spearman | Kendall |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|")


def metrics(predicted: Sequence[float], measured: Sequence[float]) -> Metrics:
    """The figures of `predicted` against `measured` (equal lengths, measured > 0)."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if p.shape != m.shape or p.ndim != 1:
        raise ValueError(f"predicted and measured differ in shape: {p.shape} vs {m.shape}")
    if len(m) == 0:
        raise ValueError("no measurements to compare with")
    if np.any(m <= 0):
        raise ValueError("measured latencies must be positive")
    rel = np.abs(p - m) / m - 1e-12  # a prediction exactly 10% off counts as within ±10%
    ranked = len(m) > 1 and np.ptp(m) > 0 and np.ptp(p) > 0
    return Metrics(
        n=len(m), within_10=float(np.mean(rel <= 0.10)), within_5=float(np.mean(rel <= 0.05)),
        mape=float(100 * np.mean(np.abs(p - m) / m)), rmse=float(math.sqrt(np.mean((p - m) ** 2))),
        spearman=float(stats.spearmanr(p, m).statistic) if ranked else float("nan"),
        kendall=float(stats.kendalltau(p, m).statistic) if ranked else float("nan"),
    )


def noise_floor(first: Sequence[float], second: Sequence[float]) -> Metrics:
    """The figures of one measurement "predicting" another of the same compiled models."""
    return metrics(second, first)
