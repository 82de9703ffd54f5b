"""Hallucination and abstention on facts of known exposure.

A decoder is trained from scratch on generated facts '<Name> is <color>.' that it sees 0, 1, 2, 4, 8 or 16
times (glassmind.evals.gen.exposure_world; exposure 0 = never named, so every answer there is a
hallucination). The model answers '<Name> is' with its most probable color. Per exposure: accuracy and the
confident-wrong rate (wrong with confidence >= 0.5, confidence = the chosen color's share of the
probability over the 8 colors). Abstention: answer only when a signal clears a threshold; three signals
give three accuracy-coverage curves and their areas (glassmind.evals.stats.aurc):

    entropy      minus the entropy of the distribution over the 8 colors
    logprob      log p(' ' + chosen color | prompt), the sequence log-probability
    agreement    share of 10 samples from that distribution equal to the chosen answer (SelfCheckGPT-style
                 consistency; answers are one word, so agreement is exact match)

Not done here: the R-Tuning SFT variant (train to say "I do not know" on facts it gets wrong) and reading
exposure back from an existing run's corpus (a run trained on the built-in world sees every fact equally often).
"""

from __future__ import annotations

import time

import numpy as np

from glassmind.evals import gen, output, toy
from glassmind.evals.context import EvalContext
from glassmind.evals.stats import aurc, bootstrap_ci, coverage_curve, wilson

CONFIDENT = 0.5
N_SAMPLES = 10


def signals(lps: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """lps (N, K) candidate log-probabilities -> chosen index and the three abstention scores (N,)."""
    lps = np.asarray(lps, dtype=float)
    p = np.exp(lps - lps.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    choice = p.argmax(1)
    rng = np.random.default_rng(seed)
    samples = np.stack([rng.choice(p.shape[1], size=N_SAMPLES, p=row) for row in p])
    return {"choice": choice, "confidence": p.max(1),
            "entropy": (p * np.log(np.clip(p, 1e-12, 1))).sum(1),  # = -H: higher is more confident
            "logprob": lps[np.arange(len(lps)), choice],
            "agreement": (samples == choice[:, None]).mean(1)}


def run(ctx: EvalContext) -> dict:
    t0 = time.time()
    exposures = (0, 1, 2, 4, 8, 16)
    docs, probes = gen.exposure_world(exposures, per_level=ctx.b["probes"])
    model_dir = toy.train(ctx.work / "exposure", docs, steps=ctx.b["steps"], context=64, batch_tokens=ctx.b["batch_tokens"], threads=ctx.threads,
                          log=ctx.log)
    model, tok = toy.load(model_dir)
    lps = np.array(toy.candidate_logprobs(model, tok, [p.prompt for p in probes], [p.candidates for p in probes]))
    s = signals(lps)
    correct = np.array([p.candidates[c] == p.answer for p, c in zip(probes, s["choice"])])
    expo = np.array([p.condition["exposure"] for p in probes])
    rows = []
    for e in exposures:
        m = expo == e
        k, n = int(correct[m].sum()), int(m.sum())
        cw = int((~correct[m] & (s["confidence"][m] >= CONFIDENT)).sum())
        rows.append({"exposure": e, "n": n, "accuracy": k / n, "acc_lo": wilson(k, n)[0], "acc_hi": wilson(k, n)[1],
                     "confident_wrong": cw / n, "cw_lo": wilson(cw, n)[0], "cw_hi": wilson(cw, n)[1],
                     "mean_confidence": float(s["confidence"][m].mean())})
    curves = {}
    for name in ("entropy", "logprob", "agreement"):
        both = np.stack([s[name], correct], 1)
        area = aurc(s[name], correct)
        ci = bootstrap_ci(both, lambda a: aurc(a[:, 0], a[:, 1].astype(bool)), n_boot=300)
        curves[name] = (coverage_curve(s[name], correct), area, ci)
        rows.append({"signal": name, "aurc": area, "aurc_lo": ci[0], "aurc_hi": ci[1]})
    output.write_points(ctx.out, rows)

    fig, (a1, a2) = output.figure(1, 2, figsize=(10, 3.8))
    er = [r for r in rows if "exposure" in r]
    xs = np.arange(len(er))
    a1.errorbar(xs, [r["accuracy"] for r in er], yerr=output.errbars([r["accuracy"] for r in er],
                [(r["acc_lo"], r["acc_hi"]) for r in er]), marker="o", capsize=3, label="accuracy")
    a1.errorbar(xs, [r["confident_wrong"] for r in er], yerr=output.errbars([r["confident_wrong"] for r in er],
                [(r["cw_lo"], r["cw_hi"]) for r in er]), marker="s", capsize=3, label=f"wrong, confidence >= {CONFIDENT}")
    a1.plot(xs, [r["mean_confidence"] for r in er], ls="--", label="mean confidence")
    a1.axhline(1 / len(gen.COLORS), color="gray", ls=":", label="chance")
    a1.set_xticks(xs, [str(e) for e in exposures])
    a1.set_xlabel("times the fact was seen in training")
    a1.set_ylim(0, 1.05)
    a1.legend(fontsize=7)
    for name, ((cov, acc), area, ci) in curves.items():
        a2.plot(cov, acc, label=f"{name} (area {area:.3f})")
    a2.axhline(correct.mean(), color="gray", ls=":", label="no abstention")
    a2.set_xlabel("coverage (share answered)")
    a2.set_ylabel("accuracy of the answered")
    a2.set_ylim(0, 1.05)
    a2.legend(fontsize=7)
    plots = [output.save(fig, ctx.out / "hallucination.png")]
    numbers = {}
    for r in er:
        numbers[f"accuracy, seen {r['exposure']}x"] = output.fmt_ci(r["accuracy"], (r["acc_lo"], r["acc_hi"]))
    for r in er:
        numbers[f"confident-wrong rate, seen {r['exposure']}x"] = output.fmt_ci(r["confident_wrong"], (r["cw_lo"], r["cw_hi"]))
    for name, (_, area, ci) in curves.items():
        numbers[f"area under accuracy-coverage, {name}"] = output.fmt_ci(area, ci)
    return output.write_result(
        ctx.out, suite="hallucination", title="Hallucination and abstention vs exposure",
        what=(f"A decoder (d_model 64, 2 layers, {ctx.b['steps']} steps) trained on '<Name> is <color>.' facts seen "
              f"0-16 times, {ctx.b['probes']} creatures per level; answers chosen among the 8 colors by log-probability."),
        numbers=numbers, plots=plots, runs=[str(model_dir)], seconds=time.time() - t0, command=ctx.command,
        notes=["Not measured: the R-Tuning SFT variant, and exposure read back from an existing run's corpus."])
