"""Small pure statistics shared by the report and the distillation diagnostic: mean and standard
deviation, and the paired bootstrap of a mean difference."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def paired_bootstrap(a: Any, b: Any, samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Bootstrap interval of mean(a) - mean(b) for paired score matrices of shape (seeds, questions).

    Each resample draws seeds (when there are several) and questions with replacement, the same
    indices for ``a`` and ``b``. Returns the observed difference, the percentile interval
    ``[lo, hi]`` at ``confidence``, and ``p_le_0``, the fraction of resamples with a difference <= 0
    (a one-sided bootstrap p-value for "a beats b").
    """
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_bootstrap: shapes {a.shape} and {b.shape} must be equal and non-empty")
    n_seeds, n_q = a.shape
    rng = np.random.default_rng(seed)
    diff = a - b  # paired: the mean difference of resampled cells is the difference of the means
    stats = np.empty(samples)
    for i in range(samples):
        rows = rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=np.int64)
        cols = rng.integers(0, n_q, n_q)
        stats[i] = diff[np.ix_(rows, cols)].mean()
    tail = (1 - confidence) / 2
    return {
        "diff": float(diff.mean()),
        "lo": float(np.quantile(stats, tail)),
        "hi": float(np.quantile(stats, 1 - tail)),
        "p_le_0": float((stats <= 0).mean()),
        "n_questions": int(n_q),
        "n_seeds": int(n_seeds),
        "samples": int(samples),
        "confidence": float(confidence),
    }
