"""Metrics of the emergence study (Schaeffer, Miranda & Koyejo 2023, "Are emergent abilities of large language
models a mirage?"): the same predictions scored by an all-or-nothing metric and by continuous ones.

Only the metrics are here so far; the `glassmind study emergence` command (a ladder of sizes on k-digit
addition) is not written yet. Every function takes per-example target token ids and either predicted ids or
the model's probabilities at the target positions.

    exact match            1 if every target token is right (the all-or-nothing metric that "jumps")
    per-token accuracy     fraction of target tokens right
    token edit distance    Levenshtein distance between predicted and target token sequences
    target log-likelihood  sum over target tokens of log p(token) under teacher forcing
    Brier score            mean over target tokens of sum_v (p_v - 1[v = target])^2 (Brier 1950)
    p^L                    exact match predicted from per-token accuracy p for L target tokens, if tokens
                           were right independently (Schaeffer et al. 2023, sec. 2)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def exact_match(pred: Sequence[int], target: Sequence[int]) -> float:
    return float(len(pred) == len(target) and all(int(a) == int(b) for a, b in zip(pred, target)))


def per_token_accuracy(pred: Sequence[int], target: Sequence[int]) -> float:
    """Position-wise: a prediction shorter than the target counts its missing positions as wrong."""
    if not len(target):
        raise ValueError("empty target")
    return sum(int(a) == int(b) for a, b in zip(pred, target)) / len(target)


def edit_distance(pred: Sequence[int], target: Sequence[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1), one row at a time."""
    prev = list(range(len(target) + 1))
    for i, a in enumerate(pred, 1):
        cur = [i]
        for j, b in enumerate(target, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = cur
    return prev[-1]


def target_log_likelihood(probs: np.ndarray, target: Sequence[int]) -> float:
    """probs (L, V): the model's distribution at each target position (teacher forcing)."""
    probs = np.asarray(probs, dtype=float)
    return float(sum(math.log(max(probs[i, t], 1e-300)) for i, t in enumerate(target)))


def brier(probs: np.ndarray, target: Sequence[int]) -> float:
    probs = np.asarray(probs, dtype=float)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(target)), np.asarray(target)] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def predicted_exact_match(per_token: float, length: int) -> float:
    """p^L: the exact match that per-token accuracy p implies for L independent target tokens."""
    return per_token ** length


def zero_resolution(n: int, confidence: float = 0.95) -> float:
    """The largest true accuracy still consistent (at `confidence`) with 0 correct out of n test examples:
    1 - (1 - confidence)^(1/n) (the exact binomial bound; about 3/n, the 'rule of three'). A test set of n
    cannot tell an accuracy below this from zero: part of why small models look like they score 'nothing'."""
    if n < 1:
        raise ValueError("n must be positive")
    return 1.0 - (1.0 - confidence) ** (1.0 / n)
