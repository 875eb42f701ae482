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


def gap_closed(
    full: Any,
    sel: Any,
    nacd: Any,
    *,
    higher_is_better: bool = True,
    paired_full: bool = True,
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """How much of FULL's lead over SEL the distilled set recovers: (M(nacd) - M(sel)) / (M(full) - M(sel)).

    The arguments are per-question score matrices of shape (seeds, questions), the same questions in the
    same order (a 1-D array is one seed). ``sel`` and ``nacd`` are paired by seed; ``full`` is too when
    ``paired_full`` (the same seeds), else its seeds are resampled on their own. Each bootstrap resample
    draws questions (the same for all three) and seeds with replacement, and the ratio's percentile
    interval is reported with the intervals of its two differences. The ratio needs no sign convention:
    for a loss both differences change sign together.

    ``status``: ``ok``; ``no_gap`` when the interval of FULL - SEL holds 0 (the ratio is then not a
    number anyone should read: ``ratio``, ``lo`` and ``hi`` are None); ``full_worse`` when FULL is
    significantly worse than SEL (there is nothing to close).
    """
    import numpy as np

    def rows(x: Any) -> Any:
        x = np.asarray(x, dtype=np.float64)
        return x[None] if x.ndim == 1 else x

    full, sel, nacd = rows(full), rows(sel), rows(nacd)
    if sel.shape != nacd.shape or full.shape[1] != sel.shape[1] or sel.size == 0:
        raise ValueError(f"gap_closed: shapes full {full.shape}, sel {sel.shape}, nacd {nacd.shape} do not match")
    if paired_full and full.shape[0] != sel.shape[0]:
        raise ValueError("gap_closed: paired_full needs as many FULL seeds as SEL seeds")
    rng = np.random.default_rng(seed)
    n_seeds, n_q = sel.shape
    gap = np.empty(samples)
    gain = np.empty(samples)
    for i in range(samples):
        cols = rng.integers(0, n_q, n_q)
        r = rng.integers(0, n_seeds, n_seeds)
        rf = r if paired_full else rng.integers(0, full.shape[0], full.shape[0])
        s = sel[np.ix_(r, cols)].mean()
        gap[i] = full[np.ix_(rf, cols)].mean() - s
        gain[i] = nacd[np.ix_(r, cols)].mean() - s
    tail = (1 - confidence) / 2

    def interval(values: Any, observed: float) -> dict[str, float]:
        return {"diff": observed, "lo": float(np.quantile(values, tail)), "hi": float(np.quantile(values, 1 - tail))}

    g = interval(gap, float(full.mean() - sel.mean()))
    d = interval(gain, float(nacd.mean() - sel.mean()))
    out: dict[str, Any] = {"gap": g, "recovered": d, "n_questions": int(n_q), "n_seeds": int(n_seeds),
                           "n_full_seeds": int(full.shape[0]), "samples": int(samples), "confidence": float(confidence),
                           "higher_is_better": bool(higher_is_better), "ratio": None, "lo": None, "hi": None}  # fmt: skip
    sign = 1.0 if higher_is_better else -1.0
    if g["lo"] <= 0 <= g["hi"]:
        out["status"] = "no_gap"
        return out
    if sign * g["diff"] < 0:
        out["status"] = "full_worse"
        return out
    ratios = gain / np.where(gap == 0, np.nan, gap)
    ratios = ratios[np.isfinite(ratios)]
    out.update(
        status="ok",
        ratio=d["diff"] / g["diff"],
        lo=float(np.quantile(ratios, tail)),
        hi=float(np.quantile(ratios, 1 - tail)),
    )
    return out


def crossing(points: Sequence[tuple[float, float]], target: float, higher_is_better: bool = True) -> dict[str, Any]:
    """Where a curve of (size, metric) points, sizes ascending, first reaches ``target``: the size by linear
    interpolation between the two points around the crossing.

    ``{"size": s, "where": "between"}``; ``{"size": None, "where": "below"}`` when the first point already
    reaches it (the target is worth less than the smallest size measured); ``{"size": None, "where":
    "beyond"}`` when no point reaches it (worth more than the largest, e.g. FULL). For a loss
    (``higher_is_better`` False) reaching means being at or below the target.
    """
    pts = sorted((float(x), float(y)) for x, y in points)
    if not pts:
        raise ValueError("crossing: no points")
    sign = 1.0 if higher_is_better else -1.0

    def reaches(y: float) -> bool:
        return sign * (y - target) >= 0

    if reaches(pts[0][1]):
        return {"size": None, "where": "below"}
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if reaches(y1):
            return {"size": x0 + (x1 - x0) * (target - y0) / (y1 - y0), "where": "between"}
    return {"size": None, "where": "beyond"}
