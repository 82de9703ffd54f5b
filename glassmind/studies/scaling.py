"""`glassmind study scaling`: scaling laws fitted the three Chinchilla ways on a FLOP-matched grid of runs.

The fitters (first half of this file) are pure numpy/scipy: a user fitting a paper's table
(`glassmind study scaling --fit points.csv`) never pays for torch's import. The study (second half) runs
the grid through the pretrain recipe, fits, pre-registers a prediction and scores it.

    Approach 1  minimum-loss envelope over training curves -> N*(C), D*(C)        (Hoffmann et al. 2022, 3.1)
    Approach 2  IsoFLOP profiles: a parabola of loss in log N per compute budget  (Hoffmann et al. 2022, 3.2)
    Approach 3  L(N, D) = E + A / N^alpha + B / D^beta, Huber loss on log-loss    (Hoffmann et al. 2022, 3.3;
                                                                                  Besiroglu et al. 2024)
    Kaplan      L(N) = (N_c / N)^alpha_N,  L(D) = (D_c / D)^alpha_D                (Kaplan et al. 2020, eq. 1.1-1.2)

Compute-optimal allocation from Approach 3 (Hoffmann et al. 2022, eq. 4, with C = 6 N D):

    N_opt(C) = G (C / 6)^(beta / (alpha + beta)),   D_opt(C) = G^-1 (C / 6)^(alpha / (alpha + beta)),
    G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

# Published fits used by the tests and the card as outside references.
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)        # Hoffmann et al. 2022, eq. 10
BESIROGLU = dict(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)  # Besiroglu et al. 2024, eq. 2


# ----------------------------------------------------------------------------------------------------
# FLOPs


def train_flops(n_params: float, tokens: float, *, n_layers: int = 0, context: int = 0, d_model: int = 0) -> float:
    """Training FLOPs = 6 N D (forward 2N per token, backward twice that; Kaplan et al. 2020 table 1) plus
    attention's scores and weighted sum, 2 * 2 * T * d per layer per token forward (QK^T and AV over the
    full T x T square, as PaLM's appendix B counts them), times 3 for training: 12 * L * T * d * D."""
    return 6.0 * n_params * tokens + 12.0 * n_layers * context * d_model * tokens


# ----------------------------------------------------------------------------------------------------
# Approach 3: L(N, D) = E + A/N^alpha + B/D^beta


def chinchilla_loss(N, D, *, E: float, A: float, B: float, alpha: float, beta: float):
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return E + A / N**alpha + B / D**beta


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative: quadratic within delta, linear outside (robust to outlier runs)."""
    a = np.abs(r)
    quad = a <= delta
    loss = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(quad, r, delta * np.sign(r))
    return loss, grad


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float):
    """Hoffmann et al. eq. 9: sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i), with
    A = exp(a), B = exp(b), E = exp(e). Working in logs keeps A, B, E positive without constraints and
    spreads the loss evenly over orders of magnitude. Returns (value, gradient) for L-BFGS."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])  # (3, n)
    m = terms.max(axis=0)
    w = np.exp(terms - m)
    s = w.sum(axis=0)
    lse = m + np.log(s)
    w = w / s  # softmax weights: d lse / d term
    h, dh = _huber(lse - logL, delta)
    grad = np.array([(dh * w[0]).sum(), (dh * w[1]).sum(), (dh * w[2]).sum(),
                     -(dh * w[0] * logN).sum(), -(dh * w[1] * logD).sum()])
    return float(h.sum()), grad


# Hoffmann et al.'s grid of initialisations (section D.2): alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5,
# ..., 1}, a, b in {0, 5, ..., 25}: 4500 starts.
START_GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
                  alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))


#          a (log A)    b (log B)    e (log E)   alpha      beta
BOUNDS = [(-20, 60), (-20, 60), (-10, 5), (0, 4), (0, 4)]


@dataclass
class Fit3:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_points: int
    intervals: dict = field(default_factory=dict)  # name -> (low, high), from the bootstrap
    n_bootstrap: int = 0
    ci: float = 0.0

    def params(self) -> dict:
        return dict(E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta)

    def predict(self, N, D):
        return chinchilla_loss(N, D, **self.params())

    def to_json(self) -> dict:
        out = {**self.params(), "n_points": self.n_points, "objective": self.objective}
        out.update(compute_optimal_exponents(self.alpha, self.beta))
        if self.intervals:
            out["intervals"] = {k: list(v) for k, v in self.intervals.items()}
            out["ci"] = self.ci
            out["n_bootstrap"] = self.n_bootstrap
        return out


def _lbfgs(theta0: np.ndarray, args: tuple, maxiter: int = 1000) -> tuple[np.ndarray, float]:
    try:
        from scipy.optimize import minimize
    except ImportError:
        from glassmind.common import GlassmindError

        raise GlassmindError("the scaling fits need scipy's L-BFGS: pip install 'glassmind[studies]' "
                             "(or pip install scipy)") from None

    # Bounds keep an under-determined fit (few points) from drifting without end along a flat valley
    # (exponents to infinity, A to exp(100)); they are far outside any published fit.
    res = minimize(_objective, theta0, args=args, jac=True, method="L-BFGS-B", bounds=BOUNDS,
                   options={"maxiter": maxiter, "gtol": 1e-10, "ftol": 1e-13})
    return res.x, float(res.fun)


def _fit3_once(logN, logD, logL, delta: float, starts: np.ndarray, top: int,
               maxiter: int = 1000) -> tuple[np.ndarray, float]:
    # Evaluate the objective at every start (cheap, vectorised over starts), then run L-BFGS from the `top`
    # best: the same minimum as L-BFGS from all 4500 on every case we tried, at a fraction of the time, which
    # is what makes the bootstrap affordable.
    vals = np.array([_objective(s, logN, logD, logL, delta)[0] for s in starts]) if len(starts) <= top else \
        _grid_values(starts, logN, logD, logL, delta)
    order = np.argsort(vals)[:top]
    best_x, best_f = None, math.inf
    for i in order:
        x, f = _lbfgs(starts[i], (logN, logD, logL, delta), maxiter)
        if np.all(np.isfinite(x)) and f < best_f:
            best_x, best_f = x, f
    return best_x, best_f


def _grid_values(starts: np.ndarray, logN, logD, logL, delta: float) -> np.ndarray:
    a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))  # (S, 1) each
    terms = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(starts), len(logN)))])
    lse = np.logaddexp(np.logaddexp(terms[0], terms[1]), terms[2])  # (S, n)
    return _huber(lse - logL, delta)[0].sum(axis=1)


def start_grid(grid: dict | None = None) -> np.ndarray:
    g = grid or START_GRID
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])), dtype=float)


def fit_approach3(N, D, loss, *, delta: float = 1e-3, bootstrap: int = 0, ci: float = 0.8, seed: int = 0,
                  top: int = 8, grid: dict | None = None) -> Fit3:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Approach 3) by L-BFGS on the Huber loss (delta 1e-3) of
    log-loss residuals, from a grid of starts. `bootstrap` > 0 refits on that many resamples of the points
    (with replacement) and reports the central `ci` percentile interval of each parameter (Besiroglu et al.
    2024 use the bootstrap to show Hoffmann et al.'s published intervals were too narrow; 80% by default
    as their table 1)."""
    N, D, L = (np.asarray(x, dtype=float).ravel() for x in (N, D, loss))
    if not (len(N) == len(D) == len(L)):
        raise ValueError(f"N, D and loss must have the same length, got {len(N)}, {len(D)}, {len(L)}")
    if len(N) < 5:
        raise ValueError(f"Approach 3 has 5 parameters: it needs at least 5 points (better 20+), got {len(N)}")
    if np.any(N <= 0) or np.any(D <= 0) or np.any(L <= 0) or not np.all(np.isfinite(np.r_[N, D, L])):
        raise ValueError("N, D and loss must be positive and finite")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    starts = start_grid(grid)
    x, f = _fit3_once(logN, logD, logL, delta, starts, top)
    fit = Fit3(E=math.exp(x[2]), A=math.exp(x[0]), B=math.exp(x[1]), alpha=float(x[3]), beta=float(x[4]),
               objective=f, n_points=len(N))
    if bootstrap:
        rng = np.random.default_rng(seed)
        # a resample starts from the full fit and from the best grid start: resamples are close to the
        # full data, so the full fit is nearly always the right basin, and the grid guards the rest
        boot_starts = np.vstack([x[None], starts[np.argsort(_grid_values(starts, logN, logD, logL, delta))[:1]]])
        draws = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(N), len(N))
            # a resample of few points can be under-determined (a flat valley L-BFGS would crawl along for
            # its whole budget); 200 iterations reach the basin's floor on well-posed resamples
            xb, _ = _fit3_once(logN[idx], logD[idx], logL[idx], delta, boot_starts, len(boot_starts), maxiter=200)
            draws.append([math.exp(xb[2]), math.exp(xb[0]), math.exp(xb[1]), xb[3], xb[4]])
        draws = np.array(draws)
        lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
        fit.intervals = {k: (float(np.percentile(draws[:, i], lo)), float(np.percentile(draws[:, i], hi)))
                         for i, k in enumerate(("E", "A", "B", "alpha", "beta"))}
        fit.n_bootstrap, fit.ci = bootstrap, ci
    return fit


def compute_optimal_exponents(alpha: float, beta: float) -> dict:
    """N_opt ~ C^a, D_opt ~ C^b with a = beta/(alpha+beta), b = alpha/(alpha+beta) (Hoffmann et al. eq. 4)."""
    return {"a": beta / (alpha + beta), "b": alpha / (alpha + beta)}


def compute_optimal(C, *, A: float, B: float, alpha: float, beta: float, **_) -> tuple[np.ndarray, np.ndarray]:
    """N_opt(C), D_opt(C) minimising L(N, D) subject to 6 N D = C (Hoffmann et al. eq. 4)."""
    C = np.asarray(C, dtype=float)
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    ex = compute_optimal_exponents(alpha, beta)
    N = G * (C / 6) ** ex["a"]
    return N, C / (6 * N)


# ----------------------------------------------------------------------------------------------------
# power laws in one variable: Kaplan's L(N), L(D), and N*(C), D*(C) of Approaches 1 and 2


def fit_power_law(x, y) -> dict:
    """y = k x^p by least squares in log-log: {"k", "p"}. Kaplan's L(N) = (N_c/N)^alpha_N is this with
    p = -alpha_N and k = N_c^alpha_N."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        raise ValueError(f"a power law needs at least 2 points, got {len(x)}")
    p, logk = np.polyfit(np.log(x), np.log(y), 1)
    return {"k": float(math.exp(logk)), "p": float(p)}


def fit_kaplan(x, loss) -> dict:
    """L(X) = (X_c / X)^alpha_X (Kaplan et al. 2020, eq. 1.1 for N, 1.2 for D): {"alpha", "Xc"}."""
    pl = fit_power_law(x, loss)
    alpha = -pl["p"]
    return {"alpha": alpha, "Xc": pl["k"] ** (1 / alpha) if alpha > 0 else float("nan")}


def approach1(curves: list[dict], *, n_levels: int = 20) -> dict:
    """Approach 1: for a set of training curves (one per model: {"N", "tokens": [...], "loss": [...], and
    "flops_per_token"}), the minimum loss over models at each of `n_levels` log-spaced compute budgets (the
    envelope), which model attains it, and power laws N*(C) = k C^a, D*(C) = k C^b through those minima.

    Budgets are interpolated along each curve in log C; a budget counts only where at least two models reach
    it (else the "minimum" is whichever single model got there). Hoffmann et al. fit on the envelope over
    runs with cosine cycles matched to each length; curves from one cosine run overstate mid-run loss."""
    if len(curves) < 2:
        raise ValueError("Approach 1 needs training curves of at least 2 model sizes")
    logc = [np.log(np.asarray(c["tokens"], float) * c["flops_per_token"]) for c in curves]
    lo = min(l.min() for l in logc)
    hi = max(l.max() for l in logc)
    levels = np.linspace(lo, hi, n_levels)
    rows = []
    for lc in levels:
        best = None
        reached = 0
        for c, l in zip(curves, logc):
            if l.min() <= lc <= l.max():
                reached += 1
                loss = float(np.interp(lc, l, np.asarray(c["loss"], float)))
                if best is None or loss < best[0]:
                    best = (loss, c["N"], math.exp(lc) / c["flops_per_token"])
        if reached >= 2:
            rows.append({"C": math.exp(lc), "loss": best[0], "N": best[1], "D": best[2]})
    out: dict = {"envelope": rows}
    if len({r["N"] for r in rows}) >= 2:
        out["N_opt"] = fit_power_law([r["C"] for r in rows], [r["N"] for r in rows])
        out["D_opt"] = fit_power_law([r["C"] for r in rows], [r["D"] for r in rows])
    return out


def approach2(points: list[dict], *, flops_key: str = "C") -> dict:
    """Approach 2: group points ({"N", "D", "loss", flops_key}) by compute budget, fit loss as a parabola in
    log N within each group, take its vertex as N*(C) (D*(C) = D at that N, from C/N), then power laws
    N*(C) = k C^a and D*(C) = k C^b. A group needs 3+ points and an upward parabola; others are reported
    in "skipped" with the reason."""
    groups: dict[float, list[dict]] = {}
    for p in points:
        groups.setdefault(float(p[flops_key]), []).append(p)
    optima, skipped = [], []
    for C, g in sorted(groups.items()):
        if len(g) < 3:
            skipped.append({"C": C, "why": f"{len(g)} points (a parabola needs 3)"})
            continue
        x = np.log([p["N"] for p in g])
        y = np.array([p["loss"] for p in g], float)
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            skipped.append({"C": C, "why": "the loss is not convex in log N here (no minimum inside)"})
            continue
        xv = -c1 / (2 * c2)
        # N*D is constant within an IsoFLOP group (C = k N D up to attention), so D* = mean(N D) / N*
        ND = float(np.exp(np.mean(np.log([p["N"] * p["D"] for p in g]))))
        n_opt = math.exp(xv)
        inside = x.min() <= xv <= x.max()
        # where the vertex fell against the sampled sizes: outside them the parabola is extrapolated
        edge = "inside" if inside else ("below the smallest size" if xv < x.min() else "above the largest size")
        optima.append({"C": C, "N_opt": n_opt, "D_opt": ND / n_opt, "loss_opt": float(c0 + c1 * xv + c2 * xv * xv),
                       "inside": bool(inside), "edge": edge, "N_min": float(math.exp(x.min())),
                       "N_max": float(math.exp(x.max())), "parabola": [float(c2), float(c1), float(c0)]})
    out: dict = {"optima": optima, "skipped": skipped}
    if len(optima) >= 2:
        out["N_opt"] = fit_power_law([o["C"] for o in optima], [o["N_opt"] for o in optima])
        out["D_opt"] = fit_power_law([o["C"] for o in optima], [o["D_opt"] for o in optima])
    return out


# ----------------------------------------------------------------------------------------------------
# points a user brings


def read_points(path) -> dict[str, np.ndarray]:
    """A CSV with columns N, D, loss (header names case-insensitive; other columns ignored)."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows (expected a header N,D,loss and one row per run)")
    keys = {k.strip().lower(): k for k in rows[0].keys() if k}
    missing = [k for k in ("n", "d", "loss") if k not in keys]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(rows[0].keys())}. "
                         "Name the columns N, D, loss")
    out = {}
    for name in ("n", "d", "loss"):
        try:
            out[name] = np.array([float(r[keys[name]]) for r in rows])
        except ValueError as e:
            raise ValueError(f"{path}: column {keys[name]!r} has a non-number: {e}") from None
    return {"N": out["n"], "D": out["d"], "loss": out["loss"]}


# ======================================================================================================
# the study: `glassmind study scaling`
# ======================================================================================================
#
#   0. config        one dataclass; the grid from --sizes x --flops, checked before any training
#   1. prepare       a tokenizer and token shards, once, shared by every run
#   2. the grid      every (size, FLOP budget) pair pre-trained by the pretrain recipe in its own process
#   3. fits          Approaches 1-3 and Kaplan's L(N), L(D), with and without embedding parameters
#   4. prediction    Approach 3 on the grid predicts a larger run's loss, written to disk, then the run
#                    trains and the prediction is scored
#   5. report        points.csv, PNGs, card.md, command.txt

import dataclasses
import json as _json
import os
import sys
import time
from pathlib import Path

from glassmind.common import GlassmindError, add_config_args, atomic_write_json, atomic_write_text, run_main


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ScalingConfig:
    out: str = _f("runs/scaling", "study directory (points/, runs/, points.csv, PNGs, card.md)")
    fit: str | None = _f(None, "fit Approach 3 to YOUR points instead: a CSV with columns N, D, loss")
    json: bool = _f(False, "with --fit: print one JSON object (E, A, B, alpha, beta, intervals, a, b)")
    bootstrap: int = _f(100, "bootstrap resamples for the intervals of Approach 3")
    ci: float = _f(0.8, "central interval of the bootstrap (0.8 = 10th to 90th percentile, as Besiroglu et al.)")
    budget: str = _f("default", "default: the grid below (minutes on 2 cores); tiny: seconds, for tests",
                     choices=("default", "tiny"))
    sizes: str | None = _f(None, "model ladder as WIDTHxLAYERS,... (heads = width/32), e.g. 32x1,48x1,64x2,96x2")
    flops: str | None = _f(None, "training FLOP budgets of the IsoFLOP grid, e.g. 1e11,3e11,1e12")
    min_ratio: float = _f(1.0, "leave out grid points with fewer training tokens per parameter than this")
    max_ratio: float = _f(300.0, "leave out grid points with more training tokens per parameter than this")
    predict_size: str | None = _f(None, "the larger run to predict, WIDTHxLAYERS (default: per budget)")
    predict_flops: float | None = _f(None, "its training FLOPs (default: per budget)")
    context: int = _f(64, "tokens per sequence")
    batch_tokens: int = _f(1024, "tokens per optimizer step")
    micro_batch: int = _f(16, "sequences per forward/backward")
    vocab_size: int = _f(512, "BPE vocabulary trained for the study (small: embeddings stay a modest share)")
    max_bytes: int = _f(12_000_000, "bytes of the built-in corpus (Python's standard library) to tokenize")
    val_fraction: float = _f(0.05, "documents held out for validation")
    evals: int = _f(8, "validation evaluations along each run (the curves of Approach 1)")
    eval_batches: int = _f(16, "validation micro-batches per evaluation (the same held-out tokens for every run)")
    min_steps: int = _f(30, "refuse a grid point with fewer optimizer steps than this")
    workers: int = _f(0, "training processes at once (0: one per core); each gets cores/workers threads")
    seed: int = _f(1337, "seed of every run")


BUDGETS = {
    # sizes (width x layers), FLOP levels, the predicted run, corpus bytes
    "default": dict(sizes="24x1,32x1,48x1,64x2,96x2", flops="1e11,3e11,1e12", min_ratio=1.5, max_ratio=120.0,
                    predict_size="128x3", predict_flops=3e12, max_bytes=12_000_000),
    "tiny": dict(sizes="16x1,24x1,32x1", flops="1e9,2e9", predict_size="32x1", predict_flops=4e9,
                 max_bytes=1_000_000, val_fraction=0.2, evals=3, eval_batches=2, min_steps=4, bootstrap=20, min_ratio=0.01,
                 max_ratio=1e6, context=32, batch_tokens=256, micro_batch=8),
}


def apply_budget(cfg: ScalingConfig, given: set[str]) -> ScalingConfig:
    """The budget's values for every field the user did not set on the command line."""
    values = {k: v for k, v in BUDGETS[cfg.budget].items() if k not in given}
    return dataclasses.replace(cfg, **values)


def parse_sizes(spec: str) -> list[tuple[int, int, int]]:
    out = []
    for item in spec.split(","):
        try:
            w, l = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise GlassmindError(f"--sizes {spec!r}: write each size as WIDTHxLAYERS, e.g. 64x2") from None
        if w < 8 or l < 1 or w % 8:
            raise GlassmindError(f"size {item}: the width must be a multiple of 8 (>= 8) and layers >= 1")
        out.append((w, l, max(1, w // 32)))
    return out


def model_numbers(width: int, layers: int, heads: int, *, vocab: int, context: int) -> dict:
    """Parameters with and without embeddings (Pearce & Song 2024: the choice moves small-scale exponents)
    and training FLOPs per token, from the model's own config (the count pretrain uses)."""
    from glassmind.model.transformer import ModelConfig

    mc = ModelConfig(arch="decoder", vocab_size=vocab, context_length=context, d_model=width, n_heads=heads,
                     n_layers=layers)
    return {"N_total": mc.num_params(), "N_nonemb": mc.num_params(non_embedding=True),
            "flops_per_token": mc.flops_per_token(context, training=True)}


def plan_grid(cfg: ScalingConfig, vocab: int, train_tokens: int | None = None) -> list[dict]:
    """Every (size, FLOP level) pair inside the tokens-per-parameter window; refused with what to change
    when a level has fewer than 3 sizes (a parabola needs 3), a run would take fewer than --min-steps
    steps, or would read more than one epoch of the training tokens."""
    sizes = parse_sizes(cfg.sizes)
    try:
        levels = sorted(float(x) for x in cfg.flops.split(","))
    except ValueError:
        raise GlassmindError(f"--flops {cfg.flops!r}: write FLOP budgets as numbers, e.g. 1e11,3e11,1e12") from None
    if cfg.context % 8 or cfg.batch_tokens % (cfg.micro_batch * cfg.context):
        raise GlassmindError(f"--batch-tokens {cfg.batch_tokens} must be a multiple of micro_batch x context = "
                             f"{cfg.micro_batch * cfg.context}")
    points, problems = [], []
    for C in levels:
        row = []
        for w, l, h in sizes:
            nums = model_numbers(w, l, h, vocab=vocab, context=cfg.context)
            steps = round(C / (nums["flops_per_token"] * cfg.batch_tokens))
            tokens = steps * cfg.batch_tokens
            ratio = tokens / nums["N_total"]
            if not (cfg.min_ratio <= ratio <= cfg.max_ratio):
                continue
            if steps < cfg.min_steps:
                problems.append(f"{w}x{l} at {C:.3g} FLOPs gets {steps} steps (< --min-steps {cfg.min_steps}): "
                                f"raise that --flops level, drop the size, or lower --batch-tokens")
            if train_tokens is not None and tokens > train_tokens:
                problems.append(f"{w}x{l} at {C:.3g} FLOPs reads {tokens:,} tokens, more than one epoch of the "
                                f"{train_tokens:,} training tokens: raise --max-bytes or lower --flops")
            row.append({"name": f"C{C:.0e}-d{w}x{l}".replace("+", ""), "width": w, "layers": l, "heads": h,
                        "C_target": C, "steps": steps, "tokens": tokens, "C": nums["flops_per_token"] * tokens,
                        **nums})
        if len(row) < 3:
            problems.append(f"the {C:.3g}-FLOP level has {len(row)} sizes inside tokens/parameter "
                            f"[{cfg.min_ratio}, {cfg.max_ratio}]: an IsoFLOP parabola needs 3; add sizes, "
                            f"widen --min-ratio/--max-ratio, or move the level")
        points += row
    if len(points) < 5:
        # found after training before: Approach 3 refused its 3 points once the runs had been paid for
        problems.append(f"the grid has {len(points)} runs: Approach 3 fits 5 parameters and needs at least 5; "
                        "add a --flops level or sizes")
    if problems:
        raise GlassmindError("the grid cannot run:\n  " + "\n  ".join(problems))
    return points


def predict_point(cfg: ScalingConfig, vocab: int, train_tokens: int | None = None) -> dict:
    (w, l, h), = parse_sizes(cfg.predict_size)
    nums = model_numbers(w, l, h, vocab=vocab, context=cfg.context)
    steps = round(cfg.predict_flops / (nums["flops_per_token"] * cfg.batch_tokens))
    tokens = steps * cfg.batch_tokens
    if steps < cfg.min_steps:
        raise GlassmindError(f"the predicted run {w}x{l} at {cfg.predict_flops:.3g} FLOPs gets {steps} steps: "
                             "raise --predict-flops")
    if train_tokens is not None and tokens > train_tokens:
        raise GlassmindError(f"the predicted run reads {tokens:,} tokens, more than the {train_tokens:,} training "
                             "tokens: raise --max-bytes or lower --predict-flops")
    return {"name": f"predict-d{w}x{l}", "width": w, "layers": l, "heads": h, "C_target": cfg.predict_flops,
            "steps": steps, "tokens": tokens, "C": nums["flops_per_token"] * tokens, **nums}


# -- 1. prepare -----------------------------------------------------------------------------------------


def data_sources() -> list[str]:
    """The built-in corpus's ordinary code: the standard library's modules and its packages' modules."""
    import sysconfig

    std = sysconfig.get_paths()["stdlib"]
    return [os.path.join(std, "*.py"), os.path.join(std, "*", "*.py")]


def prepare(cfg: ScalingConfig, root: Path) -> dict:
    """Train the study's tokenizer (once) and build the shards every run reads (once, in this process, so
    parallel runs never race to build them)."""
    from glassmind import tokenizer as tok_lib
    from glassmind.data.shards import build_shards
    from glassmind.studies.sweep import run_glassmind

    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        args = ["tokenizer", "train", "--kind", "bpe", "--vocab-size", str(cfg.vocab_size), "--input",
                *data_sources(), "--max-bytes", str(min(cfg.max_bytes, 2_000_000)), "--out", str(tok_dir)]
        run_glassmind(args, root / "logs" / "tokenizer.log")
    tok = tok_lib.load(tok_dir)
    shards = build_shards(tok, data_sources(), root=root / "shards", val_fraction=cfg.val_fraction,
                          max_bytes=cfg.max_bytes, progress=False)
    return {"tokenizer": str(tok_dir), "vocab": tok.vocab_size, "train_tokens": shards.tokens("train"),
            "val_tokens": shards.tokens("val")}


# -- 2. one grid point: the pretrain recipe in its own process ------------------------------------------


def train_point(point: dict, threads: int) -> dict:
    """Pre-train one grid point with `glassmind pretrain` and read its metrics.jsonl. A run directory left
    by a killed study resumes from its last checkpoint."""
    from glassmind.common import read_jsonl
    from glassmind.studies.sweep import run_glassmind

    run = Path(point["run"])
    steps = point["steps"]
    args = ["pretrain", "--out", str(run), "--data", *point["data"], "--max-bytes", str(point["max_bytes"]),
            "--val-fraction", str(point["val_fraction"]), "--shards-dir", point["shards_dir"],
            "--tokenizer", point["tokenizer"], "--d-model", str(point["width"]), "--n-layers", str(point["layers"]),
            "--n-heads", str(point["heads"]), "--context", str(point["context"]),
            "--micro-batch", str(point["micro_batch"]), "--batch-tokens", str(point["batch_tokens"]),
            "--steps", str(steps), "--eval-every", str(max(1, steps // point["evals"])),
            "--eval-batches", str(point["eval_batches"]), "--ckpt-every", str(max(1, steps // 4)),
            "--keep-last", "1", "--log-every", "10", "--threads", str(threads), "--seed", str(point["seed"]),
            "--peak-flops", "1e12", "--no-progress"]
    if (run / "pretrain.json").exists():
        args.append("--resume")
    run_glassmind(args, run.parent / f"{run.name}.log")
    rows = read_jsonl(run / "metrics.jsonl")
    val = [r for r in rows if r.get("split") == "val"]
    speeds = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    return {"val_loss": val[-1]["val_loss"], "val_curve": [[r["tokens"], r["val_loss"]] for r in val],
            "train_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), float("nan")),
            "tokens_per_s": speeds[len(speeds) // 2] if speeds else float("nan")}


def _with_run_args(points: list[dict], cfg: ScalingConfig, root: Path, prep: dict) -> list[dict]:
    shared = {"data": data_sources(), "max_bytes": cfg.max_bytes, "val_fraction": cfg.val_fraction,
              "shards_dir": str(root / "shards"), "tokenizer": prep["tokenizer"], "context": cfg.context,
              "micro_batch": cfg.micro_batch, "batch_tokens": cfg.batch_tokens, "evals": cfg.evals,
              "eval_batches": cfg.eval_batches, "seed": cfg.seed}
    return [{**p, **shared, "run": str(root / "runs" / p["name"])} for p in points]


# -- 3. fits ----------------------------------------------------------------------------------------------


def fit_all(results: list[dict], cfg: ScalingConfig) -> dict:
    """Every fit, once with non-embedding parameters and once with all parameters."""
    out = {}
    for key in ("N_nonemb", "N_total"):
        N = np.array([r[key] for r in results], float)
        D = np.array([r["tokens"] for r in results], float)
        L = np.array([r["val_loss"] for r in results], float)
        f3 = fit_approach3(N, D, L, bootstrap=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
        a2 = approach2([{"N": r[key], "D": r["tokens"], "loss": r["val_loss"], "C": r["C_target"]} for r in results])
        curves = [{"N": r[key], "flops_per_token": r["flops_per_token"],
                   "tokens": [t for t, _ in r["val_curve"] if t > 0], "loss": [v for t, v in r["val_curve"] if t > 0]}
                  for r in results]
        a1 = approach1(curves)
        # Kaplan: L(N) from each size's lowest loss (its longest run); L(D) from the widest model's runs
        by_n: dict = {}
        for r in results:
            by_n[r[key]] = min(by_n.get(r[key], math.inf), r["val_loss"])
        kn = fit_kaplan(list(by_n), list(by_n.values()))
        widest = max(r[key] for r in results)
        wd = [r for r in results if r[key] == widest]
        kd = fit_kaplan([r["tokens"] for r in wd], [r["val_loss"] for r in wd]) if len(wd) >= 2 else None
        out[key] = {"approach3": f3, "approach2": a2, "approach1": a1, "kaplan_N": kn, "kaplan_D": kd}
    return out


# -- 5. report --------------------------------------------------------------------------------------------


def _plots(root: Path, results: list[dict], fits: dict, pred: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    levels = sorted({r["C_target"] for r in results})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(levels)))
    a2 = fits["N_nonemb"]["approach2"]
    ax = axes[0]
    for C, col in zip(levels, colors):
        g = sorted((r for r in results if r["C_target"] == C), key=lambda r: r["N_nonemb"])
        ax.plot([r["N_nonemb"] for r in g], [r["val_loss"] for r in g], "o", color=col, label=f"C = {C:.0e}")
        o = next((o for o in a2["optima"] if o["C"] == C), None)
        if o:
            xs = np.linspace(math.log(g[0]["N_nonemb"]), math.log(g[-1]["N_nonemb"]), 50)
            c2, c1, c0 = o["parabola"]
            ax.plot(np.exp(xs), c2 * xs * xs + c1 * xs + c0, "-", color=col, lw=1)
            ax.plot([o["N_opt"]], [o["loss_opt"]], "*", color=col, ms=12)
    ax.set_xscale("log"); ax.set_xlabel("non-embedding parameters N"); ax.set_ylabel("validation loss")
    ax.set_title("Approach 2: IsoFLOP profiles (star: parabola vertex)"); ax.legend(fontsize=8)
    ax = axes[1]
    for r in results:
        pts = [(t * r["flops_per_token"], v) for t, v in r["val_curve"] if t > 0]
        ax.plot(*zip(*pts), "-", lw=1, color=plt.cm.plasma(min(1.0, math.log(r["N_nonemb"] / 5e3) / 6)))
    env = fits["N_nonemb"]["approach1"]["envelope"]
    ax.plot([e["C"] for e in env], [e["loss"] for e in env], "k--", lw=2, label="minimum over runs (Approach 1)")
    ax.set_xscale("log"); ax.set_xlabel("training FLOPs C"); ax.set_ylabel("validation loss")
    ax.set_title("training curves (colour: size) and their envelope"); ax.legend(fontsize=8)
    ax = axes[2]
    f3 = fits["N_nonemb"]["approach3"]
    meas = np.array([r["val_loss"] for r in results])
    predicted = f3.predict([r["N_nonemb"] for r in results], [r["tokens"] for r in results])
    ax.plot(meas, predicted, "o", label="grid runs (fitted)")
    if pred and "measured" in pred:
        ax.plot([pred["measured"]], [pred["predicted_nonemb"]], "r*", ms=14, label="larger run (predicted before)")
    lo, hi = min(meas.min(), predicted.min()), max(meas.max(), predicted.max())
    if pred and "measured" in pred:
        lo, hi = min(lo, pred["measured"], pred["predicted_nonemb"]), max(hi, pred["measured"], pred["predicted_nonemb"])
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel("measured validation loss"); ax.set_ylabel("Approach 3 fit L(N, D)")
    ax.set_title("Approach 3 and the pre-registered prediction"); ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "scaling.png", dpi=110)
    plt.close(fig)
    names.append("scaling.png")
    return names


def _fit_lines(fits: dict) -> list[str]:
    lines = []
    for key, label in (("N_nonemb", "non-embedding parameters"), ("N_total", "all parameters")):
        f = fits[key]
        f3 = f["approach3"]
        iv = f3.intervals

        def ci(k, v):
            return f"{v:.4g} [{iv[k][0]:.4g}, {iv[k][1]:.4g}]" if k in iv else f"{v:.4g}"

        ex = compute_optimal_exponents(f3.alpha, f3.beta)
        a1, a2 = f["approach1"], f["approach2"]
        lines += [f"### N = {label}", "",
                  f"| fit | result |", "|---|---|",
                  f"| Approach 3: E | {ci('E', f3.E)} |", f"| Approach 3: A | {ci('A', f3.A)} |",
                  f"| Approach 3: B | {ci('B', f3.B)} |", f"| Approach 3: alpha | {ci('alpha', f3.alpha)} |",
                  f"| Approach 3: beta | {ci('beta', f3.beta)} |",
                  f"| Approach 3: N_opt ~ C^a, D_opt ~ C^b | a = {ex['a']:.3f}, b = {ex['b']:.3f} |",
                  f"| Approach 2 (IsoFLOP): N_opt ~ C^a, D_opt ~ C^b | "
                  + (f"a = {a2['N_opt']['p']:.3f}, b = {a2['D_opt']['p']:.3f} ({len(a2['optima'])} budgets; vertices "
                     f"inside the sampled sizes: {sum(o['inside'] for o in a2['optima'])})" if "N_opt" in a2 else
                     "not enough budgets with a minimum") + " |",
                  f"| Approach 1 (envelope): N_opt ~ C^a, D_opt ~ C^b | "
                  + (f"a = {a1['N_opt']['p']:.3f}, b = {a1['D_opt']['p']:.3f} ({len(a1['envelope'])} budgets)"
                     if "N_opt" in a1 else "one size wins everywhere: no exponent") + " |",
                  f"| Kaplan L(N) = (N_c/N)^alpha_N | alpha_N = {f['kaplan_N']['alpha']:.3f} |"]
        if f["kaplan_D"]:
            lines.append(f"| Kaplan L(D) = (D_c/D)^alpha_D (widest model) | alpha_D = {f['kaplan_D']['alpha']:.3f} |")
        lines.append("")
    return lines


def isoflop_edges(a2: dict, results: list[dict], key: str = "N_nonemb") -> list[str]:
    """Per IsoFLOP budget, computed from the runs: is the best run at an end of the sizes sampled at that budget,
    and is the parabola's vertex inside them? Outside, N*(C) is an extrapolation of the parabola."""
    lines = []
    for o in a2["optima"]:
        g = sorted((r for r in results if r["C_target"] == o["C"]), key=lambda r: r[key])
        best = min(range(len(g)), key=lambda i: g[i]["val_loss"])
        where = ("the smallest" if best == 0 else "the largest" if best == len(g) - 1 else "an interior")
        txt = (f"- IsoFLOP {o['C']:.3g}: the lowest loss is at {where} size sampled ({g[best]['name']}, "
               f"{g[best][key]:,} parameters, of {len(g)} sizes); the parabola's vertex N* = {o['N_opt']:.3g} is ")
        if o["inside"]:
            txt += f"inside the sampled range [{o['N_min']:,.0f}, {o['N_max']:,.0f}]."
        else:
            txt += (f"{o['edge']} sampled ([{o['N_min']:,.0f}, {o['N_max']:,.0f}]): N*(C) there is an extrapolation "
                    f"of the parabola, not a measured minimum; "
                    + ("add smaller sizes at this budget" if o["edge"].startswith("below") else
                       "add larger sizes at this budget") + " to bracket it.")
        lines.append(txt)
    for sk in a2["skipped"]:
        lines.append(f"- IsoFLOP {sk['C']:.3g}: no vertex ({sk['why']}).")
    return lines


def _trend_line(fits: dict, results: list[dict]) -> str:
    """What the runs say about the direction of the trends, in words that follow the numbers."""
    kn = fits["N_nonemb"]["kaplan_N"]["alpha"]
    kd = fits["N_nonemb"]["kaplan_D"]
    n_txt = (f"the best loss of each size falls with parameters (Kaplan alpha_N = {kn:.3f})" if kn > 0 else
             f"the best loss of each size does NOT fall with parameters here (alpha_N = {kn:.3f}): the larger models "
             "had too few tokens at these budgets")
    d_txt = ("" if kd is None else f"; the widest model's loss falls with tokens (alpha_D = {kd['alpha']:.3f})"
             if kd["alpha"] > 0 else f"; the widest model's loss does NOT fall with tokens (alpha_D = {kd['alpha']:.3f})")
    return f"- On this corpus {n_txt}{d_txt}."


def write_card(root: Path, cfg: ScalingConfig, command: str, prep: dict, results: list[dict], fits: dict,
               pred: dict, seconds: float, plots: list[str]) -> None:
    f3 = fits["N_nonemb"]["approach3"]
    ex = compute_optimal_exponents(f3.alpha, f3.beta)
    err = pred["measured"] - pred["predicted_nonemb"]
    spread = float(np.std([r["val_loss"] for r in results]))
    lines = [
        "# scaling study", "", f"Command: `{command}`", "",
        f"{len(results)} decoder runs on a FLOP-matched grid (sizes {cfg.sizes} as WIDTHxLAYERS, budgets {cfg.flops} "
        f"training FLOPs), each trained by the pretrain recipe as its own process: context {cfg.context}, "
        f"{cfg.batch_tokens} tokens per step, cosine schedule to the run's own length, the depth rule's learning "
        f"rate. Data: {prep['train_tokens']:,} training / {prep['val_tokens']:,} validation tokens of the built-in "
        f"corpus (Python's standard library, BPE {prep['vocab']}); every run reads less than one epoch. FLOPs = 6ND "
        f"+ attention (12 L T d per token), D = tokens. Wall time {seconds:.0f} s.", "",
        "## Pre-registered prediction", "",
        f"Approach 3 was fitted on the grid runs only and its prediction for the larger run "
        f"({pred['point']['name']}: {pred['point']['N_nonemb']:,} non-embedding / {pred['point']['N_total']:,} total "
        f"parameters, {pred['point']['tokens']:,} tokens, {pred['point']['C']:.3g} FLOPs) was written to "
        f"prediction.json at {pred['written_at']} before that run trained.", "",
        "| | validation loss |", "|---|---|",
        f"| predicted (N non-embedding) | {pred['predicted_nonemb']:.4f} |",
        f"| predicted (N all parameters) | {pred['predicted_total']:.4f} |",
        f"| naive: the grid's best loss | {pred['naive_best']:.4f} |",
        f"| measured | {pred['measured']:.4f} |", "",
        f"Error of the prediction: {err:+.4f} nats ({100 * err / pred['measured']:+.1f}%), against "
        f"{pred['measured'] - pred['naive_best']:+.4f} for the naive guess; the grid's losses spread over "
        f"{spread:.3f} (standard deviation).", "",
        "## Fits", ""] + _fit_lines(fits) + [
        "## Where the IsoFLOP minima fall (non-embedding N)", "",
        *isoflop_edges(fits["N_nonemb"]["approach2"], results),
        f"- {sum(o['inside'] for o in fits['N_nonemb']['approach2']['optima'])} of "
        f"{len(fits['N_nonemb']['approach2']['optima'])} vertices inside the sampled sizes"
        + ("; the Approach 2 exponents rest on extrapolated vertices." if not all(
            o["inside"] for o in fits["N_nonemb"]["approach2"]["optima"]) else "."), "",
        "## What this does and does not show", "",
        _trend_line(fits, results),
        f"- Approach 3 with non-embedding N gives alpha = {f3.alpha:.3f}, beta = {f3.beta:.3f}, so the "
        f"compute-optimal split it implies is N_opt ~ C^{ex['a']:.2f}, D_opt ~ C^{ex['b']:.2f} (Chinchilla: "
        f"0.46 / 0.54; Besiroglu et al.: 0.51 / 0.49).",
        "- The models are 10^4 to 10^6 parameters trained for seconds to minutes: the exponents describe this "
        "corner only. The bootstrap intervals show how loosely this few points pin five parameters; A and B "
        "trade off against alpha and beta, so their intervals are wide even where the fitted curve is tight.",
        "- Counting embeddings or not changes the exponents at this scale (the embedding is a large share of "
        "small models), as Pearce & Song (2024) found; both are reported above.",
        "- Approach 1 uses each run's validation curve; the learning rate of a curve's middle has not decayed, so "
        "the envelope overstates mid-run loss (Hoffmann et al. trained a cosine per length). One seed per point: "
        "run-to-run noise is not measured here.",
        "", *[f"![{p}]({p})" for p in plots], ""]
    atomic_write_text(root / "card.md", "\n".join(lines))


# -- the command ------------------------------------------------------------------------------------------


def run_fit(cfg: ScalingConfig) -> int:
    try:
        pts = read_points(cfg.fit)
        fit = fit_approach3(pts["N"], pts["D"], pts["loss"], bootstrap=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    except (OSError, ValueError) as e:
        raise GlassmindError(str(e)) from None
    if cfg.json:
        print(_json.dumps(fit.to_json()))
        return 0
    ex = compute_optimal_exponents(fit.alpha, fit.beta)
    print(f"Approach 3 on {fit.n_points} points of {cfg.fit} (Huber delta 1e-3 on log-loss, L-BFGS; "
          f"{int(cfg.ci * 100)}% bootstrap intervals over {cfg.bootstrap} resamples):")
    for k, v in fit.params().items():
        iv = fit.intervals.get(k)
        print(f"  {k:<6} {v:10.4g}" + (f"   [{iv[0]:.4g}, {iv[1]:.4g}]" if iv else ""))
    print(f"  compute-optimal: N_opt ~ C^{ex['a']:.3f}, D_opt ~ C^{ex['b']:.3f}")
    return 0


def study(cfg: ScalingConfig, command: str) -> dict:
    from glassmind.studies.sweep import run_points, write_csv

    t0 = time.perf_counter()
    root = Path(cfg.out)
    # 0. a grid that cannot run is refused before anything is written (with the vocabulary the tokenizer
    # will have; rechecked against the data once the shards exist, still before any training)
    plan_grid(cfg, cfg.vocab_size)
    predict_point(cfg, cfg.vocab_size)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "command.txt", command + "\n")
    # 1. prepare
    prep = prepare(cfg, root)
    grid = plan_grid(cfg, prep["vocab"], prep["train_tokens"])
    big = predict_point(cfg, prep["vocab"], prep["train_tokens"])
    if prep["val_tokens"] < cfg.eval_batches * cfg.micro_batch * (cfg.context + 1):
        raise GlassmindError(f"only {prep['val_tokens']:,} validation tokens, fewer than one evaluation reads "
                             f"({cfg.eval_batches} x {cfg.micro_batch} x {cfg.context + 1}): raise --val-fraction "
                             "or --max-bytes, or lower --eval-batches")
    print(f"data: {prep['train_tokens']:,} train / {prep['val_tokens']:,} val tokens; {len(grid)} grid runs "
          f"+ 1 predicted run", flush=True)
    # 2. the grid
    results = run_points(root, _with_run_args(grid, cfg, root, prep), train_point, workers=cfg.workers, label="grid")
    columns = ["name", "width", "layers", "heads", "N_total", "N_nonemb", "tokens", "steps", "flops_per_token", "C",
               "C_target", "val_loss", "train_loss", "tokens_per_s", "seconds"]
    write_csv(root / "points.csv", results, columns)  # readable while the larger run trains
    # 3. fits
    fits = fit_all(results, cfg)
    # 4. the prediction: written (atomically) before the larger run trains; a resumed study keeps the first
    pred_path = root / "prediction.json"
    if pred_path.exists():
        pred = _json.loads(pred_path.read_text(encoding="utf-8"))
    else:
        pred = {"point": big, "written_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "predicted_nonemb": float(fits["N_nonemb"]["approach3"].predict(big["N_nonemb"], big["tokens"])),
                "predicted_total": float(fits["N_total"]["approach3"].predict(big["N_total"], big["tokens"])),
                "naive_best": min(r["val_loss"] for r in results),
                "fit_nonemb": fits["N_nonemb"]["approach3"].params(), "fit_total": fits["N_total"]["approach3"].params()}
        atomic_write_json(pred_path, pred)
    print(f"prediction for {big['name']} written before training: {pred['predicted_nonemb']:.4f}", flush=True)
    (big_result,) = run_points(root, _with_run_args([big], cfg, root, prep), train_point, workers=1, label="predicted run")
    pred["measured"] = big_result["val_loss"]
    atomic_write_json(root / "prediction_scored.json", pred)
    # 5. report
    write_csv(root / "points.csv", results + [big_result], columns)
    plots = _plots(root, results, fits, pred)
    seconds = time.perf_counter() - t0
    write_card(root, cfg, command, prep, results, fits, pred, seconds, plots)
    f3 = fits["N_nonemb"]["approach3"]
    print(f"Approach 3 (non-embedding N): E={f3.E:.3f} A={f3.A:.4g} B={f3.B:.4g} alpha={f3.alpha:.3f} "
          f"beta={f3.beta:.3f}; predicted {pred['predicted_nonemb']:.4f}, measured {pred['measured']:.4f}; "
          f"{root / 'card.md'}", flush=True)
    return {"results": results, "fits": fits, "prediction": pred, "seconds": seconds}


def _main(argv: list[str] | None) -> int:
    import argparse

    from glassmind.studies.sweep import command_line

    parser = argparse.ArgumentParser(prog="glassmind study scaling", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, ScalingConfig)
    hints = {f.name: f for f in dataclasses.fields(ScalingConfig)}
    ns = parser.parse_args(argv)
    argv = list(argv or [])
    given = {a.dest for a in parser._actions for opt in a.option_strings
             if any(x == opt or x.startswith(opt + "=") for x in argv)}
    cfg = ScalingConfig(**{k: v for k, v in vars(ns).items() if k in hints})
    if cfg.fit:
        return run_fit(cfg)
    cfg = apply_budget(cfg, given)
    study(cfg, command_line("scaling", argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)
