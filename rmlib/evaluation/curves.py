"""A backfill curve (metrics of the merged system at each backfilled fraction t), its
mean and spread over seeds, and the paper's conditions (6)-(8) judged on it: what the
evaluator (`rmlib.evaluation.backfill`) produces and how every results row is read.

Explained in the book: book/rank_merge, book/table1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class BackfillCurve:
    """Metrics of the merged system along the backfill, fractions in [0, 1]."""

    t: list[float]
    mAP: list[float]
    top1: list[float]
    top5: list[float]
    nfr: list[float]
    num_valid_queries: int = 0
    extras: dict = field(default_factory=dict)

    def auc(self, metric: str) -> float:
        """Area under the curve by the trapezoid rule over the t-grid (the paper's integral)."""
        return float(np.trapezoid(getattr(self, metric), self.t))

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("extras")
        out.update(auc_mAP=self.auc("mAP"), auc_top1=self.auc("top1"),
                   auc_top5=self.auc("top5"), **self.extras)
        return out


def average_curves(curves: list[BackfillCurve]) -> tuple[BackfillCurve, dict]:
    """The mean curve of several runs (seeds), and the spread: per-run AUCs, their sample
    standard deviation, and the per-t standard deviation of mAP and top-1 (for bands)."""
    def stack(metric: str) -> np.ndarray:
        return np.array([getattr(c, metric) for c in curves], dtype=np.float64)

    def std(x: np.ndarray) -> np.ndarray:
        return x.std(axis=0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1:])

    mean = BackfillCurve(curves[0].t, *(stack(m).mean(0).tolist()
                                         for m in ("mAP", "top1", "top5", "nfr")),
                         num_valid_queries=curves[0].num_valid_queries)
    spread = {}
    for metric in ("mAP", "top1"):
        aucs = np.array([c.auc(metric) for c in curves])
        spread[f"auc_{metric}_seeds"] = aucs.tolist()
        spread[f"auc_{metric}_std"] = float(std(aucs[:, None])[0])
        spread[f"{metric}_std"] = std(stack(metric)).tolist()
    return mean, spread


NOISE_FACTOR = 2.0  # a change is "within noise" when it is smaller than 2 x its std over seeds


def largest_drawdown(values) -> tuple[float, int, int]:
    """The curve's largest fall from its best earlier value, max over t2 of (max over t1 <= t2
    of M_t1) - M_t2, and the indices of that peak and trough ((0.0, 0, 0) if it never falls).

    Condition (8) asks M_t1 >= M_t2 for every t1 >= t2, not only for neighbours: a curve that
    slides down by 0.8 points a step can lose ten points over the backfill, which the largest
    step between neighbouring t hides."""
    values = np.asarray(values, dtype=np.float64)
    peaks = np.maximum.accumulate(values)
    trough = int(np.argmax(peaks - values))
    fall = float(peaks[trough] - values[trough])
    if fall <= 0:
        return 0.0, 0, 0
    return fall, int(np.argmax(values[: trough + 1])), trough


def falls_beyond_noise(values, std=None) -> bool:
    """Whether the curve falls, from any t1 to any later t2, by more than NOISE_FACTOR times
    the spread over seeds at the two points (sqrt(std_t1^2 + std_t2^2)); with no spread (one
    run), whether it falls at all. Every pair is judged, not only the largest fall: a small
    fall where the seeds agree is as real as a large one where they scatter."""
    values = np.asarray(values, dtype=np.float64)
    spread = np.zeros_like(values) if std is None else np.asarray(std, dtype=np.float64)
    later = np.triu(np.ones((len(values), len(values)), dtype=bool), k=1)  # t1 < t2
    fall = values[:, None] - values[None, :]
    noise = NOISE_FACTOR * np.hypot(spread[:, None], spread[None, :])
    return bool(((fall > 1e-12) & (fall >= noise) & later).any())


def check_conditions(curve: BackfillCurve, old_baseline: dict, new_baseline: dict,
                     metrics: tuple[str, ...] = ("mAP", "top1"),
                     std: Mapping[str, Sequence[float]] | None = None) -> dict:
    """The paper's conditions (6)-(8), checked and reported, not assumed.

    (6) M_0 >= the old system's metric, (7) M_1 >= the new system's, (8) M never falls as t
    grows: reported as the curve's largest drawdown (`largest_drawdown`, with the t of its
    peak and trough), and failed when any fall exceeds the seeds' noise
    (`falls_beyond_noise`; `std`: metric -> per-t std over seeds of the metric).
    """
    out = {}
    for m in metrics:
        values = np.asarray(getattr(curve, m))
        fall, peak, trough = largest_drawdown(values)
        spread = std.get(m) if std else None
        out[m] = {
            "M0": float(values[0]), "old": float(old_baseline[m]),
            "cond6_M0_ge_old": bool(values[0] >= old_baseline[m] - 1e-12),
            "M1": float(values[-1]), "new": float(new_baseline[m]),
            "cond7_M1_ge_new": bool(values[-1] >= new_baseline[m] - 1e-12),
            "drawdown": fall, "drawdown_from_t": float(curve.t[peak]),
            "drawdown_to_t": float(curve.t[trough]),
            "cond8_no_fall_beyond_noise": not falls_beyond_noise(values, spread),
        }
    return out


def row_conditions(row: Mapping) -> dict:
    """Conditions (6)-(8) of a results-file row, checked again from its mean curves, their
    spread over seeds and the baselines it was judged against: results written before the
    drawdown was reported get it too, and every reader sees the same verdicts."""
    stored = row["conditions"]
    curve = BackfillCurve(*(row[k] for k in ("t", "mAP", "top1", "top5", "nfr")))
    std = {m: row[f"{m}_std"] for m in stored if f"{m}_std" in row}
    return check_conditions(curve, {m: stored[m]["old"] for m in stored},
                            {m: stored[m]["new"] for m in stored}, tuple(stored), std)
