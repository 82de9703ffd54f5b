"""Metrics of the emergence study (Schaeffer, Miranda & Koyejo 2023, "Are emergent abilities of large language
models a mirage?"): the same predictions scored by an all-or-nothing metric and by continuous ones.

The first half of this file is the metrics (pure, numpy only); the second half is the study,
`glassmind study emergence`: a ladder of model sizes pre-trained by the pretrain recipe on k-digit addition,
scored at checkpoints along training. Every metric function takes per-example target token ids and either
predicted ids or the model's probabilities at the target positions.

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


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval (glassmind.evals.stats.wilson, shared with the evals): unlike
    p +- z sqrt(p(1-p)/n) it does not collapse to [0, 0] when nothing is right, which is exactly the near-zero
    accuracies of small models. 0 of 10 -> [0, 0.278]; 5 of 10 -> [0.237, 0.763]."""
    from glassmind.evals.stats import wilson

    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    return wilson(successes, n)


def n_to_resolve(accuracy: float, confidence: float = 0.95) -> float:
    """The smallest test set in which a model of true `accuracy` would get at least one example right with
    probability `confidence`, i.e. would not look like 0: ln(1 - confidence) / ln(1 - accuracy) (about
    3 / accuracy). inf for accuracy 0: no test set tells it from zero."""
    if accuracy <= 0:
        return math.inf
    if accuracy >= 1:
        return 1.0
    return float(math.ceil(math.log(1 - confidence) / math.log(1 - accuracy)))


# ----------------------------------------------------------------------------------------------------
# the verdict: is the jump of exact match visible in the continuous metrics?

# a metric "jumps" between two neighbours of a ladder when that one step carries at least this share of its
# whole change from the first rung to the last (with 4 rungs an even rise puts a third in each step)
JUMP_SHARE = 0.5
# exact match must rise at least this much (absolute) from the first rung to the last to count as a jump
JUMP_MIN_RISE = 0.1
# the continuous metrics, each oriented so that up is better (edit distance and Brier are negated)
CONTINUOUS = {"per_digit": ("per-digit accuracy", 1.0), "edit_distance": ("token edit distance", -1.0),
              "log_likelihood": ("target log-likelihood", 1.0), "brier": ("Brier score", -1.0)}


def step_shares(values: Sequence[float]) -> list[float]:
    """Each step's share of the total change from the first value to the last (nan when nothing changed)."""
    total = values[-1] - values[0]
    if abs(total) < 1e-12:
        return [math.nan] * (len(values) - 1)
    return [(b - a) / total for a, b in zip(values[:-1], values[1:])]


def jump_verdict(ladder: Sequence[dict], *, what: str = "sizes") -> dict:
    """From the numbers alone: does exact match jump along `ladder` (rows in rung order with exact_match and
    the CONTINUOUS keys), and if so, does each continuous metric jump at the same step?

    Returns {"jump": bool, "step": i (the rung pair i -> i+1) or None, "em_share", "em_rise",
    "metrics": {key: share of that metric's change in the same step}, "visible": [keys that jump there too],
    "text": one sentence}. A metric whose change over the ladder is against the better direction counts as
    not jumping (its share is negative or nan)."""
    if len(ladder) < 3:
        return {"jump": False, "step": None, "em_share": math.nan, "em_rise": math.nan, "metrics": {}, "visible": [],
                "text": f"fewer than 3 {what}: no jump can be told from a trend"}
    em = [float(r["exact_match"]) for r in ladder]
    rise = em[-1] - em[0]
    shares = step_shares(em)
    i = int(np.nanargmax(shares)) if not all(math.isnan(x) for x in shares) else 0
    out = {"step": i, "em_share": shares[i], "em_rise": rise, "metrics": {}, "visible": []}
    for key, (_, sign) in CONTINUOUS.items():
        vals = [sign * float(r[key]) for r in ladder]
        share = step_shares(vals)[i]
        out["metrics"][key] = share
        if vals[-1] > vals[0] and share >= JUMP_SHARE:
            out["visible"].append(key)
    out["jump"] = bool(rise >= JUMP_MIN_RISE and shares[i] >= JUMP_SHARE)
    if not out["jump"]:
        out["text"] = (f"exact match does not jump across these {what} (rise {rise:+.3f}; its largest step carries "
                       f"{_pct(shares[i])} of it; a jump needs a rise >= {JUMP_MIN_RISE} with >= "
                       f"{JUMP_SHARE:.0%} in one step)")
        return out
    parts = [f"{CONTINUOUS[k][0]} {_pct(v)}" for k, v in out["metrics"].items()]
    if len(out["visible"]) == len(CONTINUOUS):
        head = "the jump IS visible in every continuous metric"
    elif out["visible"]:
        head = ("the jump is visible in " + ", ".join(CONTINUOUS[k][0] for k in out["visible"])
                + " but not in the others")
    else:
        head = "the jump is NOT visible in the continuous metrics (they change smoothly)"
    out["text"] = (f"exact match jumps between rungs {i + 1} and {i + 2} ({_pct(shares[i])} of its rise of "
                   f"{rise:+.3f}); {head}: the same step carries " + ", ".join(parts) + " of their change")
    return out


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


# ======================================================================================================
# the study: `glassmind study emergence`
# ======================================================================================================
#
#   0. config        one dataclass; the ladder from --sizes, the task from --digits, checked before training
#   1. the task      k-digit addition as text, a byte-level tokenizer (one token per character, so a digit is
#                    a token), held-out problems fixed by a hash of the problem, never by a seed
#   2. the ladder    every size pre-trained by the pretrain recipe in its own process, checkpoints kept
#   3. scoring       every checkpoint of every size on the same held-out problems: greedy answers scored by
#                    exact match, per-digit accuracy and edit distance; the same problems teacher-forced for
#                    the target's log-likelihood and Brier score
#   4. report        points.csv, emergence.png, card.md (verdicts computed from the numbers), command.txt

import dataclasses
import hashlib
import json as _json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from glassmind.common import GlassmindError, add_config_args, atomic_write_text, run_main


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EmergenceConfig:
    out: str = _f("runs/emergence", "study directory (points/, runs/, points.csv, emergence.png, card.md)")
    budget: str = _f("default", "default (minutes on 2 cores) or tiny (seconds, for tests)", choices=("default", "tiny"))
    sizes: str | None = _f(None, "model ladder as WIDTHxLAYERS,... (heads = width/32), smallest first")
    digits: str | None = _f(None, "operand lengths k of the addition task, e.g. 2,3,4 (every k is trained together)")
    steps: int | None = _f(None, "optimizer steps of every size")
    checkpoints: int | None = _f(None, "checkpoints scored along each run (evenly spaced, the last is the end)")
    test_n: int | None = _f(None, "held-out problems per k (the same problems for every model and checkpoint)")
    context: int = _f(64, "tokens per training sequence (several problems; must hold the longest one)")
    batch_tokens: int = _f(1024, "tokens per optimizer step")
    micro_batch: int = _f(16, "sequences per forward/backward")
    lr: float = _f(3e-3, "peak learning rate of every size (warmup + cosine)")
    test_fraction: float = _f(0.1, "share of all k-digit problems held out (by a hash of the problem)")
    min_steps: int = _f(20, "refuse a ladder with fewer optimizer steps than this")
    workers: int = _f(0, "training processes at once (0: one per core); each gets cores/workers threads")
    seed: int = _f(1337, "seed of the training problems and of every run")


BUDGETS = {
    # 2- and 3-digit sums (4 digits were not learned by any size in 1,200 steps); more, smaller steps: at
    # this scale the count of updates matters more than the batch
    "default": dict(sizes="32x1,64x2,96x2", digits="2,3", steps=2400, checkpoints=4, test_n=400,
                    batch_tokens=1024, micro_batch=16),
    "tiny": dict(sizes="16x1,24x1,32x1", digits="2,3", steps=24, checkpoints=2, test_n=40, context=32,
                 batch_tokens=256, micro_batch=8, min_steps=4),
}


def apply_budget(cfg: EmergenceConfig, given: set[str]) -> EmergenceConfig:
    return dataclasses.replace(cfg, **{k: v for k, v in BUDGETS[cfg.budget].items() if k not in given})


# -- 1. the task -----------------------------------------------------------------------------------------


def problem_text(a: int, b: int, k: int) -> tuple[str, str]:
    """("0123+0456=", "9750"): operands zero-padded to k digits, the sum zero-padded to k + 1 digits and
    written least significant digit first. Reversed, each answer digit depends only on digits the model has
    already seen and the carry it just wrote, which makes addition learnable by small Transformers (Lee et
    al. 2023, "Teaching arithmetic to small transformers", sec. 4); the target has L = k + 1 tokens."""
    return f"{a:0{k}d}+{b:0{k}d}=", str(a + b).zfill(k + 1)[::-1]


def line_tokens(k: int) -> int:
    """Tokens of one problem line with its newline: k + 1 + k + 1 + (k + 1) + 1."""
    return 3 * k + 4


def held_out(a: int, b: int, k: int, fraction: float) -> bool:
    """Whether a problem belongs to the test split: a hash of the problem itself, so no seed, machine or
    ladder moves a problem between training and test (and 3+4 is held out whenever 3+4 is)."""
    h = hashlib.sha256(f"{k}:{a}+{b}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32 < fraction


def test_pool_size(k: int, fraction: float) -> int:
    """Expected number of held-out k-digit problems (an estimate: the hash decides each one)."""
    return int(fraction * 10 ** (2 * k))


def test_problems(k: int, n: int, fraction: float) -> list[tuple[int, int]]:
    """n distinct held-out problems, drawn in a fixed order (a constant seed: the same list on every run)."""
    rng = random.Random(f"emergence-test-{k}")
    seen: set = set()
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10 ** (2 * k):
            raise GlassmindError(f"only {len(out)} held-out {k}-digit problems found, {n} asked: lower --test-n "
                                 "or raise --test-fraction")
        a, b = rng.randrange(10 ** k), rng.randrange(10 ** k)
        if (a, b) not in seen and held_out(a, b, k, fraction):
            seen.add((a, b))
            out.append((a, b))
    return out


def write_training_data(path: Path, digits: list[int], n_tokens: int, fraction: float, seed: int) -> dict:
    """A JSONL corpus of training problems (never a held-out one), each document 16 lines of mixed k, until
    it holds n_tokens characters: what the pretrain recipe reads with --data PATH.jsonl."""
    rng = random.Random(seed)
    docs, total, problems = [], 0, 0
    while total < n_tokens:
        lines = []
        while len(lines) < 16:
            k = rng.choice(digits)
            a, b = rng.randrange(10 ** k), rng.randrange(10 ** k)
            if held_out(a, b, k, fraction):
                continue
            q, t = problem_text(a, b, k)
            lines.append(q + t + "\n")
        text = "".join(lines)
        docs.append(_json.dumps({"text": text}))
        total += len(text) + 1
        problems += len(lines)
    atomic_write_text(path, "\n".join(docs) + "\n")
    return {"train_chars": total, "train_problems": problems, "documents": len(docs)}


# -- 0. the ladder, checked before any training ----------------------------------------------------------


def parse_digits(spec: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise GlassmindError(f"--digits {spec!r}: write operand lengths like 2,3,4") from None
    if not ks or ks[0] < 1 or ks[-1] > 9:
        raise GlassmindError(f"--digits {spec!r}: operand lengths must be between 1 and 9")
    return ks


def plan(cfg: EmergenceConfig) -> dict:
    """The ladder, digits and checkpoint steps, or a GlassmindError naming what to change (before training)."""
    from glassmind.studies.scaling import parse_sizes

    sizes = parse_sizes(cfg.sizes)
    ks = parse_digits(cfg.digits)
    problems = []
    if len(sizes) < 3:
        problems.append(f"--sizes {cfg.sizes!r} has {len(sizes)} rungs: a ladder needs 3 or more to tell a jump "
                        "from a trend")
    if len(set(sizes)) != len(sizes):
        problems.append(f"--sizes {cfg.sizes!r} repeats a size")
    longest = line_tokens(ks[-1])
    if cfg.context < longest + 1:
        problems.append(f"a {ks[-1]}-digit problem is {longest} tokens with its newline: --context {cfg.context} "
                        f"cannot hold one; use --context {longest + 1} or more, or smaller --digits")
    if cfg.batch_tokens % (cfg.micro_batch * cfg.context):
        problems.append(f"--batch-tokens {cfg.batch_tokens} must be a multiple of micro_batch x context = "
                        f"{cfg.micro_batch * cfg.context}")
    if cfg.steps < cfg.min_steps:
        problems.append(f"--steps {cfg.steps} is below --min-steps {cfg.min_steps}: no size learns addition in "
                        "so few steps; raise --steps")
    if not 1 <= cfg.checkpoints <= cfg.steps:
        problems.append(f"--checkpoints {cfg.checkpoints}: between 1 and --steps ({cfg.steps})")
    elif cfg.steps // cfg.checkpoints < 1:
        problems.append("--checkpoints must not exceed --steps")
    if not 0 < cfg.test_fraction < 1:
        problems.append(f"--test-fraction {cfg.test_fraction}: between 0 and 1")
    else:
        for k in ks:
            pool = test_pool_size(k, cfg.test_fraction)
            if cfg.test_n > pool // 2:
                problems.append(f"--test-n {cfg.test_n}: only about {pool} {k}-digit problems are held out "
                                f"(--test-fraction {cfg.test_fraction} of 10^{2 * k}); use --test-n {max(1, pool // 2)} "
                                "or less, drop that k, or raise --test-fraction")
    if cfg.test_n < 1:
        problems.append("--test-n must be positive")
    if problems:
        raise GlassmindError("the ladder cannot run:\n  " + "\n  ".join(problems))
    every = cfg.steps // cfg.checkpoints
    ckpts = sorted({every * (i + 1) for i in range(cfg.checkpoints - 1)} | {cfg.steps})
    return {"sizes": sizes, "digits": ks, "checkpoint_steps": ckpts, "every": every}


# -- 2. one rung: the pretrain recipe in its own process, then every checkpoint scored ---------------------


def train_point(point: dict, threads: int) -> dict:
    from glassmind.studies.sweep import run_glassmind

    run = Path(point["run"])
    args = ["pretrain", "--out", str(run), "--data", point["data"], "--val-fraction", "0.05",
            "--shards-dir", point["shards_dir"], "--tokenizer", point["tokenizer"],
            "--d-model", str(point["width"]), "--n-layers", str(point["layers"]), "--n-heads", str(point["heads"]),
            "--context", str(point["context"]), "--micro-batch", str(point["micro_batch"]),
            "--batch-tokens", str(point["batch_tokens"]), "--steps", str(point["steps"]), "--lr", str(point["lr"]),
            "--eval-every", "0", "--eval-batches", "2", "--ckpt-every", str(point["every"]),
            # every checkpoint is kept: each one is a point on the curve along training
            "--keep-last", str(len(point["checkpoint_steps"]) + 1), "--log-every", "10",
            "--threads", str(threads), "--seed", str(point["seed"]), "--peak-flops", "1e12", "--no-progress",
            # fp32: the scores compare sizes and checkpoints, not precisions
            "--dtype", "fp32",
            # rotary positions: a problem sits at any offset of a training window, and with learned absolute
            # positions every offset would have to learn addition on its own
            "--positional", "rope"]
    if (run / "pretrain.json").exists():
        args.append("--resume")
    run_glassmind(args, run.parent / f"{run.name}.log")
    return {"evals": score_run(run, point)}


def load_checkpoint_model(run: Path, step: int):
    """The model of a run as it was at `step` (its train_state checkpoint), in eval mode."""
    from glassmind.model.files import load_config
    from glassmind.model.transformer import Transformer
    from glassmind.train import checkpoint

    model = Transformer(load_config(run))
    checkpoint.load(run / "train_state" / checkpoint.step_dir_name(step), model=model, restore_rng=False)
    return model.eval()


def score_run(run: Path, point: dict) -> list[dict]:
    from glassmind import tokenizer as tok_lib

    tok = tok_lib.load(point["tokenizer"])
    n_params = None
    rows = []
    for step in point["checkpoint_steps"]:
        model = load_checkpoint_model(run, step)
        if n_params is None:
            n_params = (model.config.num_params(), model.config.num_params(non_embedding=True))
        for k in point["digits"]:
            probs = test_problems(k, point["test_n"], point["test_fraction"])
            m = score(model, tok, probs, k)
            rows.append({"step": step, "tokens": step * point["batch_tokens"], "k": k, "L": k + 1,
                         "N_total": n_params[0], "N_nonemb": n_params[1], **m})
    return rows


def score(model, tok, problems: list[tuple[int, int]], k: int) -> dict:
    """Every metric on the same problems: greedy answers (exact match, per-digit accuracy, edit distance) and
    the target teacher-forced (log-likelihood, Brier over the whole vocabulary). Prompts start after a newline,
    as every problem but a document's first does in training."""
    import torch

    texts = [problem_text(a, b, k) for a, b in problems]
    prompts = torch.tensor([tok.encode("\n" + q) for q, _ in texts])             # (n, P): same length for one k
    targets = torch.tensor([tok.encode(t) for _, t in texts])                     # (n, L)
    L = targets.shape[1]
    with torch.no_grad():
        # teacher forcing: the distribution at each target position given the right digits before it
        logits = model(torch.cat([prompts, targets[:, :-1]], 1))[:, -L:].float()  # (n, L, V)
        p = torch.softmax(logits, -1).numpy()
        # greedy decoding, L steps (no cache needed for prompts of 20 tokens)
        ids = prompts
        for _ in range(L):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)                       # (n, 1)
            ids = torch.cat([ids, nxt], 1)
        preds = ids[:, -L:].tolist()
    tgt = targets.tolist()
    em = [exact_match(a, b) for a, b in zip(preds, tgt)]
    acc = [per_token_accuracy(a, b) for a, b in zip(preds, tgt)]
    n = len(problems)
    hits = int(sum(em))
    lo, hi = wilson_interval(hits, n)
    per_digit = float(np.mean(acc))
    return {"n": n, "exact_match": hits / n, "em_hits": hits, "em_lo": lo, "em_hi": hi,
            "per_digit": per_digit, "edit_distance": float(np.mean([edit_distance(a, b) for a, b in zip(preds, tgt)])),
            "log_likelihood": float(np.mean([target_log_likelihood(p[i], tgt[i]) for i in range(n)])),
            "brier": float(np.mean([brier(p[i], tgt[i]) for i in range(n)])),
            "predicted_em": predicted_exact_match(per_digit, L),
            "n_to_resolve": n_to_resolve(hits / n),
            # exact match on the first m problems, for the test-set-size panel
            "em_prefix": [int(sum(em[:m])) for m in prefix_sizes(n)]}


def prefix_sizes(n: int) -> list[int]:
    """Test-set sizes of the resolution panel: 10, 20, 50, 100, ... up to n."""
    out, base = [], 10
    while base < n:
        out += [m for m in (base, 2 * base, 5 * base) if m < n]
        base *= 10
    return sorted(set(out)) + [n]


# -- 3. the study ------------------------------------------------------------------------------------------


def prepare(cfg: EmergenceConfig, root: Path, digits: list[int]) -> dict:
    """The training corpus (enough characters for the longest run), a byte-level tokenizer (257 tokens: the
    256 bytes and <|endoftext|>, no merges, so every digit is its own token), and the shards, all once."""
    from glassmind import tokenizer as tok_lib
    from glassmind.data.shards import build_shards
    from glassmind.studies.sweep import run_glassmind

    data = root / "data" / "addition.jsonl"
    info_path = root / "data" / "info.json"
    if not info_path.exists():
        # 1.3x the tokens the runs read: the loader's windows are drawn at random, so less than one epoch each
        info = write_training_data(data, digits, int(1.3 * cfg.steps * cfg.batch_tokens) + 40_000,
                                   cfg.test_fraction, cfg.seed)
        from glassmind.common import atomic_write_json

        atomic_write_json(info_path, info)
    info = _json.loads(info_path.read_text(encoding="utf-8"))
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        run_glassmind(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "257", "--input", str(data),
                       "--max-bytes", "200000", "--out", str(tok_dir)], root / "logs" / "tokenizer.log")
    tok = tok_lib.load(tok_dir)
    shards = build_shards(tok, [str(data)], root=root / "shards", val_fraction=0.05, progress=False)
    return {**info, "data": str(data), "tokenizer": str(tok_dir), "vocab": tok.vocab_size,
            "train_tokens": shards.tokens("train")}


def study(cfg: EmergenceConfig, command: str) -> dict:
    from glassmind.studies.sweep import run_points, write_csv

    t0 = time.perf_counter()
    p = plan(cfg)  # refused here, before anything is written
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "command.txt", command + "\n")
    prep = prepare(cfg, root, p["digits"])
    print(f"data: {prep['train_problems']:,} training problems ({prep['train_tokens']:,} tokens), digits "
          f"{p['digits']}, {len(p['sizes'])} sizes x {len(p['checkpoint_steps'])} checkpoints", flush=True)
    shared = {"data": prep["data"], "tokenizer": prep["tokenizer"], "shards_dir": str(root / "shards"),
              "context": cfg.context, "micro_batch": cfg.micro_batch, "batch_tokens": cfg.batch_tokens,
              "steps": cfg.steps, "lr": cfg.lr, "every": p["every"], "checkpoint_steps": p["checkpoint_steps"],
              "digits": p["digits"], "test_n": cfg.test_n, "test_fraction": cfg.test_fraction, "seed": cfg.seed}
    points = [{"name": f"d{w}x{l}", "width": w, "layers": l, "heads": h, **shared, "run": str(root / "runs" / f"d{w}x{l}")}
              for w, l, h in p["sizes"]]
    results = run_points(root, points, train_point, workers=cfg.workers, label="ladder")
    rows = [{"size": r["name"], "width": r["width"], "layers": r["layers"], **e} for r in results for e in r["evals"]]
    columns = ["size", "width", "layers", "N_total", "N_nonemb", "step", "tokens", "k", "L", "n", "exact_match",
               "em_hits", "em_lo", "em_hi", "predicted_em", "per_digit", "edit_distance", "log_likelihood", "brier",
               "n_to_resolve"]
    write_csv(root / "points.csv", rows, columns)
    verdicts = verdicts_of(rows)
    plot = _plots(root, rows, verdicts)
    seconds = time.perf_counter() - t0
    write_card(root, cfg, command, prep, rows, verdicts, seconds, plot)
    print(f"done in {seconds:.0f}s; " + "; ".join(f"k={k}: {v['text'].split(';')[0]}"
                                                   for k, v in verdicts["sizes"].items()) + f"; {root / 'card.md'}",
          flush=True)
    return {"rows": rows, "verdicts": verdicts, "seconds": seconds}


def final_ladder(rows: list[dict], k: int) -> list[dict]:
    """Each size's last checkpoint at operand length k, smallest model first."""
    last = max(r["step"] for r in rows)
    return sorted((r for r in rows if r["k"] == k and r["step"] == last), key=lambda r: r["N_total"])


def training_ladder(rows: list[dict], k: int) -> list[dict]:
    """The largest size's checkpoints at operand length k, in training order."""
    big = max(r["N_total"] for r in rows)
    return sorted((r for r in rows if r["k"] == k and r["N_total"] == big), key=lambda r: r["step"])


def verdicts_of(rows: list[dict]) -> dict:
    ks = sorted({r["k"] for r in rows})
    return {"sizes": {k: jump_verdict(final_ladder(rows, k), what="sizes") for k in ks},
            "training": {k: jump_verdict(training_ladder(rows, k), what="checkpoints") for k in ks}}


# -- 4. report ---------------------------------------------------------------------------------------------


PANELS = [("exact_match", "exact match (all-or-nothing)"), ("per_digit", "per-digit accuracy"),
          ("edit_distance", "token edit distance (lower is better)"),
          ("log_likelihood", "target log-likelihood (nats)"), ("brier", "Brier score (lower is better)")]


def _plots(root: Path, rows: list[dict], verdicts: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in rows})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(ks)))
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.6))
    flat = axes.ravel()
    # row 1 and the first of row 2: the five metrics of the same predictions against model size
    for ax, (key, title) in zip(list(flat[:4]) + [flat[4]], PANELS):
        for k, col in zip(ks, colors):
            lad = final_ladder(rows, k)
            xs = [r["N_nonemb"] for r in lad]
            ax.plot(xs, [r[key] for r in lad], "o-", color=col, label=f"k = {k} (L = {k + 1})")
            if key == "exact_match":
                ax.fill_between(xs, [r["em_lo"] for r in lad], [r["em_hi"] for r in lad], color=col, alpha=0.15)
                ax.plot(xs, [r["predicted_em"] for r in lad], "--", color=col, lw=1)
        ax.set_xscale("log"); ax.set_xlabel("non-embedding parameters"); ax.set_title(title, fontsize=10)
    flat[0].legend(fontsize=8, title="band: Wilson 95%; dashed: p^L")
    # p^L against the measured exact match, every size, checkpoint and k
    ax = flat[5]
    for k, col in zip(ks, colors):
        g = [r for r in rows if r["k"] == k]
        ax.plot([r["exact_match"] for r in g], [r["predicted_em"] for r in g], "o", color=col, ms=4, label=f"k = {k}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("measured exact match"); ax.set_ylabel("p^L from per-digit accuracy p")
    ax.set_title("exact match predicted as p^L (every size, checkpoint, k)", fontsize=10); ax.legend(fontsize=8)
    # test-set size: the Wilson interval of exact match on the first m problems, hardest k, every size
    ax = flat[6]
    k = ks[-1]
    lad = final_ladder(rows, k)
    sizes = prefix_sizes(lad[0]["n"])
    for r, col in zip(lad, plt.cm.plasma(np.linspace(0, 0.85, len(lad)))):
        iv = [wilson_interval(h, m) for h, m in zip(r["em_prefix"], sizes)]
        ax.fill_between(sizes, [a for a, _ in iv], [b for _, b in iv], color=col, alpha=0.18)
        ax.plot(sizes, [h / m for h, m in zip(r["em_prefix"], sizes)], "o-", color=col, ms=3, label=r["size"])
    ax.plot(sizes, [zero_resolution(m) for m in sizes], "k--", lw=1, label="0 of m: upper bound")
    ax.set_xscale("log"); ax.set_xlabel("test problems m"); ax.set_ylabel(f"exact match, k = {k}")
    ax.set_title("how many test problems resolve a near-zero accuracy", fontsize=10); ax.legend(fontsize=7)
    # along training: exact match and per-digit accuracy of every size against training tokens, hardest k
    ax = flat[7]
    for size, col in zip(dict.fromkeys(r["size"] for r in sorted(rows, key=lambda r: r["N_total"])),
                         plt.cm.plasma(np.linspace(0, 0.85, len(lad)))):
        g = sorted((r for r in rows if r["size"] == size and r["k"] == k), key=lambda r: r["step"])
        ax.plot([r["tokens"] for r in g], [r["exact_match"] for r in g], "o-", color=col, label=f"{size} exact")
        ax.plot([r["tokens"] for r in g], [r["per_digit"] for r in g], "s:", color=col, ms=3)
    ax.set_xlabel("training tokens"); ax.set_title(f"along training, k = {k} (solid: exact, dotted: per-digit)",
                                                   fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "emergence.png", dpi=100)
    plt.close(fig)
    return "emergence.png"


def write_card(root: Path, cfg: EmergenceConfig, command: str, prep: dict, rows: list[dict], verdicts: dict,
               seconds: float, plot: str) -> None:
    ks = sorted({r["k"] for r in rows})
    last = max(r["step"] for r in rows)
    lines = ["# emergence study", "", f"Command: `{command}`", "",
             f"A ladder of decoders ({cfg.sizes} as WIDTHxLAYERS) pre-trained by the pretrain recipe, each as its own "
             f"process, for {cfg.steps} steps x {cfg.batch_tokens} tokens (context {cfg.context}, lr {cfg.lr}, fp32) "
             f"on {prep['train_problems']:,} generated addition problems of {ks} digits (answers written least "
             f"significant digit first, one token per character). Every checkpoint of every size is scored on the "
             f"same {cfg.test_n} held-out problems per k (held out by a hash of the problem, never seen in "
             f"training): greedy answers give exact match, per-digit accuracy and token edit distance; the same "
             f"problems teacher-forced give the answer's log-likelihood and Brier score. Wall time {seconds:.0f} s.",
             "", "## The ladder at the end of training", "",
             "| size | non-emb params | k | exact match [Wilson 95%] | p^L | per-digit | edit dist | log-lik | Brier "
             "| n to resolve |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in ks:
        for r in final_ladder(rows, k):
            lines.append(f"| {r['size']} | {r['N_nonemb']:,} | {k} | {r['exact_match']:.3f} [{r['em_lo']:.3f}, "
                         f"{r['em_hi']:.3f}] | {r['predicted_em']:.3f} | {r['per_digit']:.3f} | "
                         f"{r['edit_distance']:.2f} | {r['log_likelihood']:.2f} | {r['brier']:.3f} | "
                         f"{_n_txt(r['n_to_resolve'])} |")
    err = np.array([r["predicted_em"] - r["exact_match"] for r in rows])
    lines += ["", "## Is the jump in exact match visible in the continuous metrics?", "",
              f"Computed from the table's numbers: along a ladder, exact match 'jumps' when it rises by at least "
              f"{JUMP_MIN_RISE} from the first rung to the last and one step between neighbours carries at least "
              f"{JUMP_SHARE:.0%} of that rise; a continuous metric shows the jump when the same step carries at "
              f"least {JUMP_SHARE:.0%} of its own change (else its change is spread over the ladder: smooth).", ""]
    for k in ks:
        lines.append(f"- across sizes, k = {k}: {verdicts['sizes'][k]['text']}.")
    for k in ks:
        lines.append(f"- along training of the largest size, k = {k}: {verdicts['training'][k]['text']}.")
    near = [r for r in rows if r["step"] == last and r["exact_match"] < 0.05]
    lines += ["", "## p^L and test-set size", "",
              f"- Exact match predicted from per-digit accuracy p as p^L (digits right independently): mean error "
              f"{err.mean():+.3f}, mean absolute error {np.abs(err).mean():.3f} over {len(rows)} (size, checkpoint, "
              f"k) points; p^L is above the measured on {int((err > 1e-9).sum())}, below on {int((err < -1e-9).sum())} "
              "(above: fewer problems are entirely right than independent digits of one accuracy p would give; "
              "digit positions of unequal difficulty alone do this, since the product of per-position accuracies is "
              "at most their mean to the L).",
              f"- {cfg.test_n} test problems cannot tell an exact match below {zero_resolution(cfg.test_n):.4f} from "
              f"zero (95%, 0 right); a model with true accuracy a needs about 3/a problems to get one right. "
              + (f"{len(near)} final (size, k) points score under 0.05: " + ", ".join(
                  f"{r['size']} k={r['k']} at {r['exact_match']:.3f} ({_resolve_txt(r['n_to_resolve'])})"
                  for r in near[:8]) + "." if near else "No final point scores under 0.05."),
              "- One seed per size and tiny models trained for minutes: the verdicts describe this run only. "
              "Per-digit accuracy and edit distance are computed on the same greedy answers as exact match; "
              "log-likelihood and Brier on the same problems with the right digits fed in (teacher forcing).",
              "", f"![{plot}]({plot})", ""]
    atomic_write_text(root / "card.md", "\n".join(lines))


def _resolve_txt(n: float) -> str:
    return "0 right: no test set size resolves it" if math.isinf(n) else f"resolved from 0 by n >= {int(n):,}"


def _n_txt(n: float) -> str:
    return "never (0 right)" if math.isinf(n) else f"{int(n):,}"


def _main(argv: list[str] | None) -> int:
    import argparse

    from glassmind.studies.sweep import command_line

    argv = list(argv or [])
    parser = argparse.ArgumentParser(prog="glassmind study emergence", description=__doc__.split("\n\n")[0])
    add_config_args(parser, EmergenceConfig)
    ns = parser.parse_args(argv)
    given = {a.dest for a in parser._actions for opt in a.option_strings
             if any(x == opt or x.startswith(opt + "=") for x in argv)}
    cfg = apply_budget(EmergenceConfig(**vars(ns)), given)
    study(cfg, command_line("emergence", argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)
