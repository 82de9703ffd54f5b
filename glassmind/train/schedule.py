"""Learning-rate schedule: linear warmup, then cosine or linear decay to a floor.

A pure function of the step, so resuming a run needs only the step number (no scheduler object to save),
and every rank computes the same value without talking to the others.
"""

from __future__ import annotations

import math

from glassmind.common import GlassmindError

DECAYS = ("cosine", "linear", "constant")


def lr_at(step: int, *, max_lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps.

    Warmup: lr rises linearly from max_lr/warmup to max_lr over `warmup_steps` steps ((step+1)/warmup, so the
    very first update is not wasted at lr 0). Then it decays from max_lr to `min_lr_ratio * max_lr` at the
    last step, along half a cosine period (Loshchilov & Hutter 2017, SGDR, without restarts) or a straight
    line. Steps past `total_steps` stay at the floor.
    """
    if decay not in DECAYS:
        raise GlassmindError(f"unknown lr decay {decay!r}: use one of {', '.join(DECAYS)}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise GlassmindError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return max_lr
    min_lr = max_lr * min_lr_ratio
    span = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)  # 0 after warmup -> 1 at the last step
    if decay == "cosine":
        return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max_lr - (max_lr - min_lr) * progress
