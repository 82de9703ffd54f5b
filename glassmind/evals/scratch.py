"""The from-scratch suites: each trains small decoders on generated data (glassmind.evals.gen) through the
pretrain recipe and measures one failure with closed-form ground truth. They need no run: with RUN given they
write under RUN/evals/<suite>/ so the run's report card shows them.

    reversal     the reversal curse (Berglund et al. 2023), with and without reverse-augmented data
    arithmetic   addition length generalisation, plain vs reversed digits (Lee et al. 2023)
"""

from __future__ import annotations

import time

import numpy as np

from glassmind.evals import gen, output, toy, verdict
from glassmind.evals.context import EvalContext
from glassmind.evals.stats import accuracy_row


def _choose(model, tok, probes) -> list[bool]:
    lps = toy.candidate_logprobs(model, tok, [p.prompt for p in probes], [p.candidates for p in probes])
    return [p.candidates[int(np.argmax(lp))] == p.answer for p, lp in zip(probes, lps)]


def reversal(ctx: EvalContext) -> dict:
    t0 = time.time()
    rows = []
    data = {augment: gen.reversal_data(n_pairs=ctx.b["probes"], n_bridge=60, augment=augment, repeats=20)
            for augment in (False, True)}
    runs = toy.train_many([dict(out=ctx.work / ("rev-augmented" if augment else "rev-forward-only"), docs=docs,
                                steps=ctx.b["steps"], batch_tokens=ctx.b["batch_tokens"])
                           for augment, (docs, _) in data.items()], threads=ctx.threads, log=ctx.log)
    for (augment, (_, probes)), run in zip(data.items(), runs):
        model, tok = toy.load(run)
        ok = _choose(model, tok, probes)
        for d in ("forward", "reverse"):
            rows.append(accuracy_row([o for o, p in zip(ok, probes) if p.condition["direction"] == d],
                                 data="with reverse" if augment else "forward only", direction=d,
                                 chance=1 / ctx.b["probes"]))
    output.write_points(ctx.out, rows)
    fig, ax = output.figure(figsize=(5.5, 3.6))
    for i, d in enumerate(("forward", "reverse")):
        r = [x for x in rows if x["direction"] == d]
        ax.bar(np.arange(2) + 0.38 * i, [x["accuracy"] for x in r], 0.38, label=d,
               yerr=output.errbars([x["accuracy"] for x in r], [(x["ci_lo"], x["ci_hi"]) for x in r]), capsize=3)
    ax.axhline(1 / ctx.b["probes"], color="gray", ls=":", label="chance")
    ax.set_xticks(np.arange(2) + 0.19, ["trained forward only", "reverse facts added"])
    ax.set_ylabel("accuracy (95% Wilson)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    plots = [output.save(fig, ctx.out / "reversal.png")]
    numbers = {f"{x['direction']} accuracy, {x['data']}": output.fmt_ci(x["accuracy"], (x["ci_lo"], x["ci_hi"]))
               for x in rows}
    numbers["chance"] = 1 / ctx.b["probes"]
    return output.write_result(
        ctx.out, suite="reversal", title="The reversal curse, from scratch",
        what=(f"{ctx.b['probes']} pairs stated as \"A's parent is B.\" (20 times each); 60 other pairs in both "
              "directions teach the reverse template. Test: \"B's child is\" -> A among the "
              f"{ctx.b['probes']} children (log-probability choice)."),
        numbers=numbers, plots=plots, seconds=time.time() - t0, command=ctx.command,
        runs=[str(ctx.work / n) for n in ("rev-forward-only", "rev-augmented")])


def arithmetic(ctx: EvalContext) -> dict:
    t0 = time.time()
    test_digits = (1, 2, 3, 4, 5)
    rows = []
    data = {fmt: gen.arithmetic_data(train_digits=3, test_digits=test_digits, fmt=fmt, n_train=20000,
                                     n_test=ctx.b["probes"]) for fmt in gen.ARITH_FORMATS}
    # vocab 257: the 256 bytes and <|endoftext|>, no merges, so every digit, sign and hint is one token
    runs = toy.train_many([dict(out=ctx.work / f"add-{fmt}", docs=docs, steps=ctx.b["arith_steps"], context=64,
                                vocab_size=257, batch_tokens=ctx.b["batch_tokens"])
                           for fmt, (docs, _) in data.items()], threads=ctx.threads, log=ctx.log)
    for (fmt, (_, probes)), run in zip(data.items(), runs):
        model, tok = toy.load(run)
        answers = toy.greedy(model, tok, [p.prompt for p in probes], max_new_tokens=2 * (max(test_digits) + 1) + 1,
                             stop=";")
        ok = [a == p.answer for a, p in zip(answers, probes)]
        for d in test_digits:
            rows.append(accuracy_row([o for o, p in zip(ok, probes) if p.condition["digits"] == d],
                                 digits_format=fmt, operand_digits=d, trained_on="1-3 digits"))
    output.write_points(ctx.out, rows)
    fig, ax = output.figure(figsize=(5.5, 3.6))
    for fmt in gen.ARITH_FORMATS:
        r = [x for x in rows if x["digits_format"] == fmt]
        ax.errorbar(test_digits, [x["accuracy"] for x in r], yerr=output.errbars(
            [x["accuracy"] for x in r], [(x["ci_lo"], x["ci_hi"]) for x in r]), marker="o", capsize=3,
            label={"hints": "reversed + index hints"}.get(fmt, fmt))
    ax.axvspan(0.5, 3.5, color="0.9", label="trained lengths")
    ax.set_xlabel("digits per operand")
    ax.set_ylabel("exact-match accuracy (95% Wilson)")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=8)
    plots = [output.save(fig, ctx.out / "arithmetic.png")]
    numbers = {f"{x['digits_format']}, {x['operand_digits']} digits": output.fmt_ci(x["accuracy"], (x["ci_lo"], x["ci_hi"]))
               for x in rows}
    return output.write_result(
        ctx.out, suite="arithmetic", title="Arithmetic length generalisation",
        what=(f"Decoders (RoPE, d_model 64, 2 layers, {ctx.b['arith_steps']} steps, byte tokens: one per digit) trained "
              "on 20,000 additions of 1-3 digit operands written plainly ('123+45=168'), least significant digit "
              "first ('321+54=861'), or reversed with index hints ('a3b2c1+a5b4=a8b6c1', letters from a random "
              "offset in training: a position-coupling trick in the data, Zhou et al. 2023/2024); greedy exact "
              "match on new sums of 1-5 digit operands. Abacus embeddings (McLeish et al. 2024) would need a "
              "positional encoding the model does not have; index hints are the data-side form of the same idea."),
        numbers=numbers, plots=plots, seconds=time.time() - t0, command=ctx.command,
        runs=[str(ctx.work / f"add-{f}") for f in gen.ARITH_FORMATS], notes=verdict.arithmetic(rows, 3))
