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

R-Tuning (glassmind.evals.rtuning): the same model fine-tuned through the sft recipe to say "I do not know" on
the facts of one half of the creatures it got wrong, compared on the other half with the threshold curves.
Exposure read back (glassmind.evals.exposure): each RUN given is scored on the color facts of both worlds, grouped
by how often each appears in the training data its lineage's pretrain.json names.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from glassmind.common import GlassmindError
from glassmind.evals import exposure, gen, output, rtuning, toy
from glassmind.evals.context import EvalContext
from glassmind.evals.stats import aurc, bootstrap_ci, coverage_curve, wilson

CONFIDENT = 0.5
N_SAMPLES = 10
RTUNING_LR = 1e-3


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
    # R-Tuning: fine-tune this model to say IDK where it was wrong, compare on the held-out half
    rt = rtuning.run(ctx.work / "rtuning", model_dir, probes, s, steps=ctx.b["rtuning_steps"],
                     lr=RTUNING_LR, threads=ctx.threads, log=ctx.log)
    for who, key in (("R-tuned (abstains by saying IDK)", "rtuned"), ("R-tuned, made to answer all", "rtuned_all"),
                     ("base, answers all", "base_all"),
                     *((f"base, {n} threshold at R-tuned coverage", f"base_{n}_at_rtuned_coverage")
                       for n in ("entropy", "logprob", "agreement"))):
        m = rt[key]
        rows.append({"heldout_model": who, **{k: m[k] for k in ("n", "answered", "coverage", "accuracy",
                                                                 "confident_wrong")}})
    for name, c in rt["curves"].items():
        rows.append({"heldout_curve": name, "aurc": c["aurc"], "aurc_lo": c["ci"][0], "aurc_hi": c["ci"][1]})
    # exposure read back: the given runs, scored on facts whose exposure is counted in their training data
    notes, readback = [], []
    for run_dir in ctx.runs:
        try:
            rb = readback_run(run_dir, ctx.b["probes"], ctx.log)
        except GlassmindError as e:
            notes.append(f"exposure read-back, {run_dir}: {e}")
            continue
        readback.append(rb)
        rows += rb["rows"]
    output.write_points(ctx.out, rows)

    fig, (a1, a2, a3) = output.figure(1, 3, figsize=(15, 3.8))
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
    _plot_rtuning(a3, rt)
    plots = [output.save(fig, ctx.out / "hallucination.png")]
    if readback:
        plots.append(_plot_readback(ctx, readback))
    numbers = {}
    for r in er:
        numbers[f"accuracy, seen {r['exposure']}x"] = output.fmt_ci(r["accuracy"], (r["acc_lo"], r["acc_hi"]))
    for r in er:
        numbers[f"confident-wrong rate, seen {r['exposure']}x"] = output.fmt_ci(r["confident_wrong"], (r["cw_lo"], r["cw_hi"]))
    for name, (_, area, ci) in curves.items():
        numbers[f"area under accuracy-coverage, {name}"] = output.fmt_ci(area, ci)
    numbers.update(rtuning_numbers(rt))
    for rb in readback:
        numbers.update(rb["numbers"])
        notes.append(rb["note"])
    return output.write_result(
        ctx.out, suite="hallucination", title="Hallucination and abstention vs exposure",
        what=(f"A decoder (d_model 64, 2 layers, {ctx.b['steps']} steps) trained on '<Name> is <color>.' facts seen "
              f"0-16 times, {ctx.b['probes']} creatures per level; answers chosen among the 8 colors by log-probability."),
        numbers=numbers, plots=plots, runs=[str(model_dir), rt["sft_run"]], seconds=time.time() - t0,
        command=ctx.command, notes=[rtuning_verdict(rt), *notes])


def readback_facts(per_level: int) -> list[tuple[str, str]]:
    """The color facts of both fictional worlds: the built-in one the demo pre-trains on
    (glassmind.data.tasks.world) and this suite's exposure world at `per_level` creatures per level (the
    budget's: a run pre-trained on another size of it has other colors for the same names)."""
    from glassmind.data.tasks import world

    facts = [(e.name, e.color) for e in world(0)]
    facts += [(p.condition["name"], p.answer) for p in gen.exposure_world(per_level=per_level)[1]]
    return list(dict.fromkeys(facts))


def readback_run(run_dir, per_level: int, log=print) -> dict:
    """Accuracy vs exposure counted in an existing run's training data (glassmind.evals.exposure)."""
    model, tok = toy.load(run_dir)
    if model.config.arch != "decoder":
        raise GlassmindError(f"a {model.config.arch} is not scored here: answering '<Name> is' needs a decoder; "
                             "the from-scratch exposure model above applies to any run")
    facts = readback_facts(per_level)
    rb = exposure.read_back(run_dir, facts, log=log)
    counts = np.array(rb["counts"])
    lps = np.array(toy.candidate_logprobs(model, tok, [f"{n} is" for n, _ in facts], [gen.COLORS] * len(facts)))
    correct = np.array([gen.COLORS[int(i)] == c for i, (_, c) in zip(lps.argmax(1), facts)])
    bins = np.array([exposure.bin_of(int(c)) for c in counts])
    rows, numbers = [], {}
    name = Path(run_dir).name
    for b in sorted(set(bins.tolist())):
        m = bins == b
        k, n = int(correct[m].sum()), int(m.sum())
        lo, hi = wilson(k, n)
        label = "0" if b == 0 else f"{b}" if b == 1 else f"{b}-{2 * b - 1}"
        rows.append({"readback_run": str(run_dir), "counted_exposure": label, "exposure_lo": b, "n": n,
                     "accuracy": k / n, "acc_lo": lo, "acc_hi": hi})
        numbers[f"{name}: accuracy, counted {label}x in its training data (n={n})"] = output.fmt_ci(k / n, (lo, hi))
    note = (f"Exposure read back for {run_dir}: {len(facts)} color facts counted in the training split of "
            f"{rb['pretrain_run']} ({rb['data'] or 'the built-in corpus'}; {rb['train_bytes']:,} bytes, "
            f"{rb['trained_tokens']:,} tokens trained on, so epochs ~ tokens / that split's tokens); the run answers "
            "'<Name> is' among the 8 colors.")
    return {"run": str(run_dir), "rows": rows, "numbers": numbers, "note": note}


def _plot_readback(ctx: EvalContext, readback: list[dict]) -> str:
    fig, ax = output.figure(figsize=(5.5, 3.6))
    for rb in readback:
        r = rb["rows"]
        xs = np.arange(len(r))
        ax.errorbar(xs, [x["accuracy"] for x in r], yerr=output.errbars([x["accuracy"] for x in r],
                    [(x["acc_lo"], x["acc_hi"]) for x in r]), marker="o", capsize=3, label=Path(rb["run"]).name)
        ax.set_xticks(xs, [x["counted_exposure"] for x in r])
    ax.axhline(1 / len(gen.COLORS), color="gray", ls=":", label="chance")
    ax.set_xlabel("times the fact appears in the run's training data (counted)")
    ax.set_ylabel("accuracy (95% Wilson)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    return output.save(fig, ctx.out / "exposure_readback.png")


def rtuning_numbers(rt: dict) -> dict:
    out = {"R-Tuning SFT set": f"{rt['n_sft']} questions, {rt['n_sft_idk']} labelled 'I do not know' (the base "
                                 f"model was wrong there); {rt['n_heldout']} held out"}
    for who, key in (("R-tuned", "rtuned"), ("R-tuned made to answer all", "rtuned_all"), ("base, all", "base_all"),
                     ("base, entropy threshold at R-tuned coverage", "base_entropy_at_rtuned_coverage")):
        m = rt[key]
        lo, hi = wilson(m["right"], m["answered"]) if m["answered"] else (float("nan"), float("nan"))
        out[f"held-out {who}: coverage"] = round(m["coverage"], 3)
        out[f"held-out {who}: accuracy of the answered"] = (output.fmt_ci(m["accuracy"], (lo, hi))
                                                            if m["answered"] else "nothing answered")
        cw = m["n_confident_wrong"]
        out[f"held-out {who}: confident-wrong rate"] = output.fmt_ci(m["confident_wrong"], wilson(cw, m["n"]))
    for name, c in rt["curves"].items():
        out[f"held-out area under accuracy-coverage, {name}"] = output.fmt_ci(c["aurc"], c["ci"])
    for e in sorted(set(rt["exposure"].tolist())):  # does the R-tuned model abstain where it never saw the fact?
        m = rt["exposure"] == e
        k, n = int(rt["rtuned_answered"][m].sum()), int(m.sum())
        out[f"held-out R-tuned: share answered, seen {e}x"] = output.fmt_ci(k / n, wilson(k, n))
    return out


def rtuning_verdict(rt: dict) -> str:
    """One sentence from the numbers: does R-Tuning beat threshold abstention at its own coverage?"""
    r, b = rt["rtuned"], rt["base_entropy_at_rtuned_coverage"]
    if not r["answered"]:
        return ("R-Tuning: the fine-tuned model said 'I do not know' to every held-out question (coverage 0): "
                "no operating point to compare.")
    ri, bi = wilson(r["right"], r["answered"]), wilson(b["right"], b["answered"])
    if ri[0] > bi[1] or bi[0] > ri[1]:
        better = "R-Tuning" if r["accuracy"] > b["accuracy"] else "the base model's entropy threshold"
        verdict = f"{better} is more accurate (95% intervals apart)"
    else:
        verdict = "no difference in accuracy (95% intervals overlap)"
    return (f"R-Tuning at coverage {r['coverage']:.2f}: accuracy of the answered {r['accuracy']:.2f} "
            f"[{ri[0]:.2f}, {ri[1]:.2f}] vs the base model answering its {b['answered']} most confident "
            f"(entropy) {b['accuracy']:.2f} [{bi[0]:.2f}, {bi[1]:.2f}]: {verdict}. Made to answer everything, "
            f"the fine-tuned model is right on {rt['rtuned_all']['accuracy']:.2f} of the held-out questions "
            f"against the base model's {rt['base_all']['accuracy']:.2f} (what fine-tuning did to its knowledge).")


def _plot_rtuning(ax, rt: dict) -> None:
    for name, c in rt["curves"].items():
        cov, acc = c["curve"]
        ax.plot(cov, acc, ls="-" if name.startswith("R-") else "--", label=f"{name} (area {c['aurc']:.3f})")
    r = rt["rtuned"]
    if r["answered"]:
        ax.plot([r["coverage"]], [r["accuracy"]], "k*", ms=12, label="R-tuned says IDK (its operating point)")
    ax.axhline(rt["base_all"]["accuracy"], color="gray", ls=":", label="base, no abstention")
    ax.set_title(f"held-out facts (n={rt['n_heldout']}): R-Tuning vs thresholds", fontsize=9)
    ax.set_xlabel("coverage (share answered)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6)
