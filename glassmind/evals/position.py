"""Position bias, "lost in the middle" (Liu et al. 2023): is a key-value record found as well at the start, in
the middle and at the end of a context, for each positional encoding (sinusoidal, learned, RoPE)?

The question is only meaningful on a model that has learned to look a key up at all, so this suite trains its
own small decoders in a loop of its own (as glassmind.studies.induction does), not through the pretrain
recipe, whose causal-LM loss counts every token. The earlier version of this suite (the pretrain recipe on
'Name has food.' records and a question in words, 500 and 2000 steps) stayed at chance in every cell; on this
suite's own data the loss on every next token still stays at chance through 1500 steps, while the loss on
the lookups alone learns (benchmarks/explore_position_loss.py prints both curves); presumably the unpredictable tokens
(the random keys and values of the records) swamp the gradient, and the recipe has no per-token loss mask.
Half of each batch is copy rows, which teach the induction circuit (Olsson et al. 2022) that lookup reuses.

The vocabulary is words, one token each: [UNK], '.', KEYS names, VALUES foods (gen.FOODS). A batch row is
either

    lookup  'K1 V1 . K2 V2 . ... Kn Vn .' (n uniform in 1..16, distinct keys), then every key again in a random
            order, each followed by its value and '.'; the loss is on those values only (the lookups);
    copy    a random segment of words repeated until the row is full; the loss is on every token that a
            previous occurrence determines (from the second copy on).

A probe is n records and then one of their keys, at index 0 (start), n // 2 (middle) or n - 1 (end); the
model's answer is the value with the largest next-token logit (chance 1 / len(VALUES)).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glassmind.evals import gen, output, verdict
from glassmind.evals.context import EvalContext
from glassmind.evals.stats import accuracy_row

N_KEYS = 120
MAX_RECORDS = 16
CONTEXT = 6 * MAX_RECORDS  # training rows: records (3 tokens each) then as many lookups (3 tokens each)
TEST_RECORDS = (4, 8, 16, 32)  # 32: beyond the trained length, and the query at a position never trained
MODEL_CONTEXT = 3 * max(TEST_RECORDS) + 1  # a learned table this long; rows past CONTEXT stay at their init
PLACES = ("start", "middle", "end")
ENCODINGS = ("sinusoidal", "learned", "rope")
ROWS_PER_STEP = 16
LR = 1e-3
# warmup, then constant: lookup forms in a sudden drop, and a cosine decay slows the steps around it (rope,
# 1500 steps: held-out lookup 0.96 at step 1050 at a constant rate, 0.46 with the cosine decay;
# benchmarks/explore_position_loss.py OUT 1500 rope constant|cosine)
DECAY = "constant"
WIDTH, LAYERS, HEADS = 128, 2, 4


def vocabulary() -> list[str]:
    keys = gen.names(N_KEYS, random.Random("position-keys"))
    return ["[UNK]", ".", *keys, *gen.FOODS]


KEY_IDS = list(range(2, 2 + N_KEYS))
VALUE_IDS = list(range(2 + N_KEYS, 2 + N_KEYS + len(gen.FOODS)))
VOCAB = 2 + N_KEYS + len(gen.FOODS)
DOT = 1


def lookup_row(rng: random.Random, n: int) -> tuple[list[int], list[int]]:
    """(ids, targets): n records, then every key asked once in a random order; targets[t] is the token the
    model must predict at t (the value after an asked key), -100 elsewhere."""
    keys = rng.sample(KEY_IDS, n)
    vals = [rng.choice(VALUE_IDS) for _ in keys]
    ids = [t for k, v in zip(keys, vals) for t in (k, v, DOT)]
    tgt = [-100] * len(ids)
    for j in rng.sample(range(n), n):
        ids += [keys[j], vals[j], DOT]
        tgt += [vals[j], -100, -100]
    return ids, tgt


def copy_row(rng: random.Random, length: int = CONTEXT) -> tuple[list[int], list[int]]:
    """A random segment of m words (m uniform in length/8 .. length/2) repeated to fill the row; targets from
    the end of the first copy on."""
    m = rng.randint(max(2, length // 8), length // 2)
    seg = [rng.choice(KEY_IDS + VALUE_IDS) for _ in range(m)]
    ids = (seg * (length // m + 1))[:length]
    tgt = [-100] * (m - 1) + ids[m:] + [-100]
    return ids, tgt


def batch(rng: random.Random, rows: int = ROWS_PER_STEP) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(rows, CONTEXT, dtype=torch.long)
    tgt = torch.full((rows, CONTEXT), -100, dtype=torch.long)
    for i in range(rows):
        r, t = lookup_row(rng, rng.randint(1, MAX_RECORDS)) if i % 2 == 0 else copy_row(rng)
        ids[i, :len(r)] = torch.tensor(r)
        tgt[i, :len(t)] = torch.tensor(t)
    return ids, tgt


def probes(n_per_cell: int, seed: int = 1) -> list[dict]:
    """n_per_cell contexts for every (records, place): ids (records then the asked key), answer, condition."""
    rng = random.Random(f"position-probes:{seed}")
    out = []
    for n in TEST_RECORDS:
        for place in PLACES:
            idx = {"start": 0, "middle": n // 2, "end": n - 1}[place]
            for _ in range(n_per_cell):
                keys = rng.sample(KEY_IDS, n)
                vals = [rng.choice(VALUE_IDS) for _ in keys]
                ids = [t for k, v in zip(keys, vals) for t in (k, v, DOT)] + [keys[idx]]
                out.append({"ids": ids, "answer": vals[idx], "n_records": n, "position": place, "index": idx})
    return out


@torch.no_grad()
def answers(model, items: list[dict]) -> list[int]:
    """The value each probe's context makes most likely next (contexts of one length are batched)."""
    model.eval()
    out = [0] * len(items)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(items):
        by_len.setdefault(len(p["ids"]), []).append(i)
    values = torch.tensor(VALUE_IDS)
    for _, idx in by_len.items():
        logits = model(torch.tensor([items[i]["ids"] for i in idx]))[:, -1, values]
        for i, a in zip(idx, logits.argmax(-1).tolist()):
            out[i] = VALUE_IDS[a]
    return out


def train_point(point: dict, threads: int) -> dict:
    """Train one decoder (in a pool worker), save it as a run directory, return its learning curve. `point`:
    positional, steps, seed, out; optional decay (the lr schedule, default DECAY) and loss ("all": the causal-LM
    loss on every next token instead of the lookups and copies, for benchmarks/explore_position_loss.py)."""
    from glassmind.model import ModelConfig, Transformer, save_model
    from glassmind.tokenizer.wordpiece import WordPieceTokenizer
    from glassmind.train.optim import adamw
    from glassmind.train.schedule import lr_at

    torch.set_num_threads(threads)
    out, steps, seed = Path(point["out"]), point["steps"], point["seed"]
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(arch="decoder", vocab_size=VOCAB, context_length=MODEL_CONTEXT, d_model=WIDTH,
                                    n_heads=HEADS, n_layers=LAYERS, positional=point["positional"], dropout=0.0))
    opt = adamw(model, lr=LR, weight_decay=0.01)
    rng = random.Random(f"position-train:{seed}")
    held_out = probes(16, seed=10_000 + seed)
    held_out = [p for p in held_out if p["n_records"] == MAX_RECORDS]
    every = max(1, steps // 20)
    curve = []
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, max_lr=LR, total_steps=steps, warmup_steps=min(50, max(1, steps // 10)),
                                decay=point.get("decay", DECAY))
        model.train()
        ids, tgt = batch(rng)
        if point.get("loss") == "all":  # the causal-LM loss on every next token, as the pretrain recipe computes it
            tgt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        loss = F.cross_entropy(model(ids).flatten(0, 1), tgt.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            acc = float(np.mean([a == p["answer"] for a, p in zip(answers(model, held_out), held_out)]))
            curve.append({"step": step + 1, "loss": float(loss.detach()), "lookup_accuracy": acc,
                          "seconds": round(time.time() - t0, 1)})
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    WordPieceTokenizer.of_words(vocabulary()).save(out)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve), encoding="utf-8")
    return {"curve": curve, "train_seconds": round(time.time() - t0, 1)}


def run(ctx: EvalContext) -> dict:
    from glassmind.model import load_model
    from glassmind.train import pool

    t0 = time.time()
    steps = ctx.b["position_steps"]
    points = [{"name": f"pos-{pe}-{steps}-{DECAY}-ctx{MODEL_CONTEXT}", "positional": pe, "steps": steps, "seed": 0,
               "out": str(ctx.work / f"pos-{pe}")} for pe in ENCODINGS]
    ctx.log(f"  training {len(points)} decoders ({steps} steps each; lookup accuracy logged as they learn)")
    trained = pool.run_points(ctx.work, points, train_point, workers=min(ctx.threads or 0, len(points)),
                              label="position models")
    items = probes(ctx.b["probes"])
    rows = []
    for pe, point in zip(ENCODINGS, points):
        model = load_model(point["out"])
        got = answers(model, items)
        for n in TEST_RECORDS:
            for place in PLACES:
                ok = [a == p["answer"] for a, p in zip(got, items) if p["n_records"] == n and p["position"] == place]
                rows.append(accuracy_row(ok, positional=pe, n_pairs=n, position=place))
    output.write_points(ctx.out, rows)
    chance = 1 / len(VALUE_IDS)
    fig, axes = output.figure(1, 4, figsize=(15, 3.6))
    for ax, pe in zip(axes, ENCODINGS):
        for n in TEST_RECORDS:
            r = [x for x in rows if x["positional"] == pe and x["n_pairs"] == n]
            ax.errorbar([0, 1, 2], [x["accuracy"] for x in r], yerr=output.errbars(
                [x["accuracy"] for x in r], [(x["ci_lo"], x["ci_hi"]) for x in r]), marker="o", capsize=3,
                label=f"{n} records")
        ax.axhline(chance, color="gray", ls=":", label="chance")
        ax.set_xticks([0, 1, 2], list(PLACES))
        ax.set_title(pe)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("lookup accuracy (95% Wilson)")
    axes[0].legend(fontsize=8)
    for pe, res in zip(ENCODINGS, trained):
        axes[3].plot([c["step"] for c in res["curve"]], [c["lookup_accuracy"] for c in res["curve"]], label=pe)
    axes[3].axhline(chance, color="gray", ls=":")
    axes[3].set_xlabel("training step")
    axes[3].set_title(f"learning to look up ({MAX_RECORDS} records)")
    axes[3].set_ylim(0, 1.05)
    axes[3].legend(fontsize=8)
    plots = [output.save(fig, ctx.out / "position.png")]
    numbers = {}
    longest = max(TEST_RECORDS)
    for n in (MAX_RECORDS, longest):
        for pe in ENCODINGS:
            for place in PLACES:
                r = [x for x in rows if x["positional"] == pe and x["n_pairs"] == n and x["position"] == place][0]
                numbers[f"{pe} {place} ({n} records)"] = output.fmt_ci(r["accuracy"], (r["ci_lo"], r["ci_hi"]))
    for pe, res in zip(ENCODINGS, trained):
        formed = next((c["step"] for c in res["curve"] if c["lookup_accuracy"] >= 0.5), None)
        numbers[f"{pe}: first logged step with held-out lookup accuracy >= 0.5"] = formed if formed else "never"
    return output.write_result(
        ctx.out, suite="position", title="Position bias: key-value lookup by place in the context",
        what=(f"Decoders (d_model {WIDTH}, {LAYERS} layers x {HEADS} heads, {steps} steps of {ROWS_PER_STEP} rows, "
              "loss on the looked-up values and on copy rows only; glassmind/evals/position.py) on contexts of "
              f"1-{MAX_RECORDS} 'key value .' records, each key then asked; tested with the asked record at the "
              f"start, middle or end of {', '.join(map(str, TEST_RECORDS))} records ({longest}: beyond the trained "
              f"length, the query at a position training never reached); chance 1/{len(VALUE_IDS)}."),
        numbers=numbers, plots=plots, runs=[p["out"] for p in points], seconds=time.time() - t0,
        command=ctx.command,
        notes=verdict.position(rows, chance, MAX_RECORDS) + [
            f"Beyond training: {x}" for x in verdict.position(rows, chance, longest)])
