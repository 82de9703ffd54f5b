"""The numbers every eval reports, each small and pinned to hand-worked examples in tests/test_evals.py.

    wilson(k, n)                      95% Wilson score interval of a proportion (Wilson 1927)
    accuracy_row(ok, **condition)     one measured cell: n, correct, accuracy and its Wilson interval
    bootstrap_ci(values, stat)        percentile bootstrap interval of any statistic of a sample
    ece(conf, correct, bins)          expected calibration error, equal-width bins (Guo et al. 2017, eq. 3)
    reliability(conf, correct, bins)  the diagram's per-bin (count, mean confidence, accuracy)
    coverage_curve(score, correct)    accuracy of the answers kept when abstaining below each threshold
    aurc(...)                         area under that accuracy-coverage curve
    weat(X, Y, A, B)                  WEAT effect size and a permutation p-value (Caliskan et al. 2017)

numpy only; inputs are plain sequences or arrays.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) /
    (1 + z^2/n). Unlike the normal interval it stays inside [0, 1] and is not empty at k=0 or k=n."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} outside 0..n={n}")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def accuracy_row(ok: Sequence[bool], **condition) -> dict:
    """A row of points.csv for one condition: its fields, then n, correct, accuracy and the Wilson interval."""
    k, n = int(sum(ok)), len(ok)
    lo, hi = wilson(k, n)
    return {**condition, "n": n, "correct": k, "accuracy": k / max(n, 1), "ci_lo": lo, "ci_hi": hi}


def bootstrap_ci(values: Sequence, stat: Callable[[np.ndarray], float] = np.mean, *, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap: resample the rows with replacement n_boot times, take the alpha/2 and
    1-alpha/2 quantiles of the statistic. `values` may be 2-D (rows resampled together)."""
    arr = np.asarray(values)
    if len(arr) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arr), size=(n_boot, len(arr)))
    stats = np.array([stat(arr[i]) for i in idx], dtype=float)
    return (float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2)))


def _bin_index(conf: np.ndarray, bins: int) -> np.ndarray:
    # bins (i/M, (i+1)/M]; confidence 0 goes in the first bin (Guo et al. 2017's B_m)
    return np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)


def reliability(conf: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict]:
    """Per equal-width bin: lo, hi, count, mean confidence, accuracy (None where empty)."""
    c = np.asarray(conf, dtype=float)
    y = np.asarray(correct, dtype=float)
    if c.shape != y.shape:
        raise ValueError(f"confidences {c.shape} and correctness {y.shape} differ in shape")
    if len(c) and (c.min() < 0 or c.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    b = _bin_index(c, bins)
    out = []
    for i in range(bins):
        m = b == i
        n = int(m.sum())
        out.append({"lo": i / bins, "hi": (i + 1) / bins, "count": n,
                    "confidence": float(c[m].mean()) if n else None, "accuracy": float(y[m].mean()) if n else None})
    return out


def ece(conf: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| over equal-width confidence bins."""
    rows = reliability(conf, correct, bins)
    n = sum(r["count"] for r in rows)
    if n == 0:
        return float("nan")
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]))


def coverage_curve(score: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Answer the k most confident questions (higher score = more confident), abstain on the rest, for
    k = 1..n: returns (coverage k/n, accuracy among the k answered). Ties in the score are broken by keeping
    the tied block together (a threshold cannot split them), so a useless constant score gives the flat
    curve at the overall accuracy."""
    s = np.asarray(score, dtype=float)
    y = np.asarray(correct, dtype=float)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("score and correctness must be 1-D and of one length")
    n = len(s)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    cum = np.cumsum(y_sorted)
    # for each k, the threshold keeps the whole tie block containing position k-1
    last_of_block = np.searchsorted(-s_sorted, -s_sorted, side="right")  # index one past each tie block
    kept = last_of_block
    cov = kept / n
    acc = cum[kept - 1] / kept
    return cov, acc


def aurc(score: Sequence[float], correct: Sequence[bool]) -> float:
    """Area under the accuracy-coverage curve: the mean over k=1..n of the accuracy of the k most
    confident answers (a step-function integral over coverage in steps of 1/n). Equals the accuracy for an
    uninformative score, approaches 1 - (1-acc)^2/2 for a perfect ranking (large n), and is lower for a score
    that ranks the wrong answers first. (This is 1 minus the risk-coverage AURC of Geifman et al. 2019.)"""
    cov, acc = coverage_curve(score, correct)
    if len(cov) == 0:
        return float("nan")
    return float(acc.mean())


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def weat_effect_size(X, Y, A, B) -> float:
    """Caliskan et al. 2017: s(w,A,B) = mean_a cos(w,a) - mean_b cos(w,b);
    d = (mean_x s(x) - mean_y s(y)) / std_{w in X u Y} s(w)  (sample std, ddof=1)."""
    X, Y, A, B = (np.asarray(v, dtype=float) for v in (X, Y, A, B))
    sx = _cos(X, A).mean(1) - _cos(X, B).mean(1)
    sy = _cos(Y, A).mean(1) - _cos(Y, B).mean(1)
    return float((sx.mean() - sy.mean()) / np.concatenate([sx, sy]).std(ddof=1))


def weat(X, Y, A, B, *, n_perm: int = 10_000, seed: int = 0) -> dict:
    """Effect size and a one-sided permutation p-value: the share of equal-size re-partitions (X_i, Y_i)
    of X u Y whose test statistic sum_x s(x) - sum_y s(y) is at least the observed one. Exact (every
    partition) when there are at most n_perm of them, else n_perm random ones."""
    X, Y, A, B = (np.asarray(v, dtype=float) for v in (X, Y, A, B))
    if len(X) != len(Y) or len(X) < 2 or len(A) < 1 or len(B) < 1:
        raise ValueError("WEAT needs two target sets of one size (>= 2) and two non-empty attribute sets")
    W = np.concatenate([X, Y])
    s = _cos(W, A).mean(1) - _cos(W, B).mean(1)
    n = len(X)
    observed = s[:n].sum() - s[n:].sum()
    total = s.sum()
    n_parts = math.comb(2 * n, n)
    if n_parts <= n_perm:
        stats = np.array([2 * s[list(c)].sum() - total for c in itertools.combinations(range(2 * n), n)])
    else:
        rng = np.random.default_rng(seed)
        stats = np.array([2 * s[rng.permutation(2 * n)[:n]].sum() - total for _ in range(n_perm)])
    p = float((stats >= observed - 1e-12).mean())
    return {"effect_size": weat_effect_size(X, Y, A, B), "p_value": p, "partitions": int(min(n_parts, n_perm)),
            "exact": n_parts <= n_perm}
