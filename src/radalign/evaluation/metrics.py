"""Metric values with their uncertainty: bootstrap confidence intervals for one run, mean +- std over seeds.

Every number in results.json is a :class:`Metric`, so a reader always knows how sure it is and how it was
obtained. Metric functions themselves come from scikit-learn / torchmetrics where they exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np


@dataclass
class Metric:
    """A value and how uncertain it is: a bootstrap 95% interval (``low``/``high``) or the spread over seeds."""

    value: float
    low: float | None = None
    high: float | None = None
    std: float | None = None
    n: int | None = None  # samples (bootstrap) or runs (seeds) behind it
    method: Literal["point", "bootstrap", "seeds"] = "point"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metric:
        return cls(**data)

    def __str__(self) -> str:
        if np.isnan(self.value):
            return "n/a"
        if self.method == "seeds" and self.std is not None:
            # one run has no spread to show: "± 0.000" would claim a measured zero
            return f"{self.value:.3f} ± {self.std:.3f}" if (self.n or 0) > 1 else f"{self.value:.3f} (1 seed)"
        if self.low is not None and self.high is not None:
            return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"
        return f"{self.value:.3f}"


def over_seeds(values: Sequence[float]) -> Metric:
    """Mean and sample standard deviation over independent runs (NaN runs are left out)."""
    finite = np.asarray([v for v in values if not np.isnan(v)], dtype=float)
    if not len(finite):
        return Metric(float("nan"), n=0, method="seeds")
    std = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0
    return Metric(float(finite.mean()), std=std, n=len(finite), method="seeds")


def bootstrap(
    statistic: Callable[..., float],
    *arrays: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Metric:
    """``statistic(*arrays)`` with a percentile bootstrap interval over resampled rows (all arrays together).

    Resamples where the statistic is undefined (NaN, e.g. an AUROC with one class drawn) are dropped.
    """
    value = float(statistic(*arrays))
    n = len(arrays[0])
    if resamples <= 0 or n < 2 or np.isnan(value):
        return Metric(value, n=n, method="point")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        index = rng.integers(0, n, n)
        with np.errstate(all="ignore"):
            try:
                s = float(statistic(*(a[index] for a in arrays)))
            except ValueError:  # scikit-learn refuses one-class resamples
                continue
        if not np.isnan(s):
            stats.append(s)
    if not stats:
        return Metric(value, n=n, method="point")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Metric(value, float(low), float(high), n=n, method="bootstrap")


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of one finding over rows labelled 0 or 1 (uncertain -1 and missing NaN left out); NaN if one class."""
    from sklearn.metrics import roc_auc_score

    keep = np.isin(labels, (0.0, 1.0))
    y = labels[keep]
    if not 0 < y.sum() < len(y):
        return float("nan")
    return float(roc_auc_score(y, scores[keep]))


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean of the per-column AUROCs that are defined; (N, K) labels and scores."""
    values = [binary_auroc(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")
