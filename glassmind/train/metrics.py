"""What a run reports: `metrics.jsonl` rows, a loss-curve PNG, `card.md`, and model FLOPs utilisation.

Only rank 0 writes; the loop calls these on every rank and they return at once elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from glassmind.common import append_jsonl, atomic_write_bytes, atomic_write_text, is_rank0, read_jsonl


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl


class MetricsLog:
    """Appends one JSON object per line to `run_dir/metrics.jsonl`.

    Train rows: `{"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}`; eval rows add
    `"split": "val"` with `val_loss`, `val_ppl`, `val_bpb`. On resume, `truncate_after(step)` drops the rows a
    killed run wrote after its last checkpoint, so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / "metrics.jsonl"

    def log(self, row: dict) -> None:
        if is_rank0():
            append_jsonl(self.path, row)

    def rows(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []

    def truncate_after(self, step: int) -> None:
        if not is_rank0() or not self.path.exists():
            return
        kept = [r for r in self.rows() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------------------------------
# plots


def plot_loss(rows: Iterable[dict], path: str | os.PathLike, *, title: str = "loss") -> Path | None:
    """Train loss (and validation loss where present) against tokens seen."""
    if not is_rank0():
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    rows = list(rows)
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r and r.get("split") != "val"
             and math.isfinite(r["loss"])]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------
# model FLOPs utilisation


def mfu(tokens_per_s: float, train_flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, appendix B): the FLOPs the model needs per
    token (forward + backward, ~6N + attention) times tokens per second, over the hardware's peak."""
    if peak_flops <= 0:
        return float("nan")
    return tokens_per_s * train_flops_per_token / peak_flops


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                         n: int = 1024, seconds: float = 0.5) -> float:
    """The machine's achievable dense matmul rate (FLOP/s) for `dtype`: square n x n products, best of a
    short run. This is the 'peak' MFU divides by when no datasheet number is given."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------------------------------
# card.md


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_card(run_dir: str | os.PathLike, *, title: str, what: str, parent: str | None,
               numbers: dict[str, Any], config: dict[str, Any] | None = None,
               plots: Iterable[str] = ()) -> Path | None:
    """`card.md`: what was done, from which parent run, the key numbers, the plots, the full config."""
    if not is_rank0():
        return None
    lines = [f"# {title}", "", what, "", f"Parent: {parent or 'none (trained from scratch)'}", "",
             "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in numbers.items()]
    for p in plots:
        lines += ["", f"![{p}]({p})"]
    if config:
        lines += ["", "## Configuration", "", "```json", json.dumps(config, indent=2, default=str), "```"]
    return atomic_write_text(Path(run_dir) / "card.md", "\n".join(lines) + "\n")
