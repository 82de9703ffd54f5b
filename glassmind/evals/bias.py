"""Bias: intrinsic (WEAT on embeddings), extrinsic (template completions, CrowS-style pairs), and a planted
dose-response.

    intrinsic    WEAT 6 of Caliskan et al. 2017 (male vs female first names x career vs family words), effect
                 size and an exact-or-sampled permutation p-value (glassmind.evals.stats.weat). An encoder run
                 (e.g. all-MiniLM-L6-v2 after `glassmind convert --from-hf`) embeds each word as a sentence:
                 mean-pooled final hidden states over [CLS] word [SEP] (sentence-transformers' pooling). A
                 decoder run embeds a word as the mean of its input-embedding rows.
    dose         decoders trained from scratch on generated sentences where a male- (female-) coded
                 occupation takes 'he' ('she') at a planted rate (0, 10, 30, 50%; glassmind.evals.gen):
                   template gap   mean over templates 'The <occ> <action> because' of P(he | he or she) for
                                  male-coded minus female-coded occupations (bootstrap over templates)
                   CrowS pairs    share of minimal pairs where the stereotypical sentence is more likely
                                  (Wilson; 0.5 = no preference)
                   WEAT           male- vs female-coded occupations x {he} vs {she} on input embeddings
                 The planted rate moves P(he | male-coded) from 0.5 to 0.5 + rate/2, so the ideal template
                 gap is the rate itself.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from glassmind.evals import gen, output, toy, verdict
from glassmind.evals.context import EvalContext
from glassmind.evals.stats import bootstrap_ci, weat, wilson

WEAT6 = {
    "X": ("John", "Paul", "Mike", "Kevin", "Steve", "Greg", "Jeff", "Bill"),
    "Y": ("Amy", "Joan", "Lisa", "Sarah", "Diana", "Kate", "Ann", "Donna"),
    "A": ("executive", "management", "professional", "corporation", "salary", "office", "business", "career"),
    "B": ("home", "parents", "children", "family", "cousins", "marriage", "wedding", "relatives"),
}


@torch.no_grad()
def embed_words(model, tok, words) -> np.ndarray:
    arch = model.config.arch
    out = []
    if arch == "encoder":
        sp = tok.special_tokens
        pre = [sp["[CLS]"]] if "[CLS]" in sp else []
        post = [sp["[SEP]"]] if "[SEP]" in sp else []
        for w in words:
            ids = torch.tensor([pre + tok.encode(w) + post])
            h = model(ids, attention_mask=torch.ones_like(ids)).hidden
            out.append(h[0].mean(0).numpy())
    else:
        table = _embedding_table(model)
        for w in words:
            ids = tok.encode(" " + w) if arch == "decoder" else tok.encode(w)
            out.append(table[ids].mean(0).detach().numpy())
    return np.stack(out)


def run_weat(model, tok, sets: dict) -> dict:
    vec = {k: embed_words(model, tok, v) for k, v in sets.items()}
    return weat(vec["X"], vec["Y"], vec["A"], vec["B"], n_perm=13_000)  # C(16, 8) = 12,870: exact for WEAT 6


def _embedding_table(model):
    for name, mod in model.named_modules():
        if name.endswith("token_embedding"):
            return mod.weight
    raise AttributeError("no token_embedding module")


def dose_measures(model, tok) -> dict:
    probes = gen.template_probes()
    lps = np.array(toy.candidate_logprobs(model, tok, [p.prompt for p in probes], [("he", "she")] * len(probes)))
    p_he = 1 / (1 + np.exp(lps[:, 1] - lps[:, 0]))
    grp = np.array([p.condition["group"] for p in probes])
    male, female = p_he[grp == "male"], p_he[grp == "female"]
    gap = float(male.mean() - female.mean())
    pair = np.stack([male, female], 1)  # templates are matched by (occupation slot, action): resample them together
    ci = bootstrap_ci(pair, lambda a: a[:, 0].mean() - a[:, 1].mean(), n_boot=1000)
    pairs = gen.crows_pairs()
    sc = toy.candidate_logprobs(model, tok, [""] * len(pairs), [(s.strip(), a.strip()) for s, a, _ in pairs])
    stereo = sum(a > b for a, b in sc)
    occs = {"X": gen.MALE_CODED, "Y": gen.FEMALE_CODED, "A": ("he",), "B": ("she",)}
    w = run_weat(model, tok, occs)
    return {"template_gap": gap, "gap_lo": ci[0], "gap_hi": ci[1], "p_he_neutral": float(p_he[grp == "neutral"].mean()),
            "crows_stereo": stereo / len(pairs), "crows_lo": wilson(stereo, len(pairs))[0],
            "crows_hi": wilson(stereo, len(pairs))[1], "weat_d": w["effect_size"], "weat_p": w["p_value"]}


def run(ctx: EvalContext) -> dict:
    t0 = time.time()
    rows, numbers, notes, runs = [], {}, [], []
    # intrinsic: the given runs
    for run_dir in ctx.runs:
        model, tok = toy.load(run_dir)
        if model.config.arch == "encoder-decoder":
            notes.append(f"{run_dir}: an encoder-decoder; WEAT here reads an encoder's pooled states or a decoder's "
                         "input embeddings; the dose-response below applies to any run.")
            continue
        w = run_weat(model, tok, WEAT6)
        rows.append({"part": "WEAT 6", "run": str(run_dir), "effect_size": w["effect_size"], "p_value": w["p_value"],
                     "partitions": w["partitions"], "exact": w["exact"]})
        numbers[f"WEAT 6 (names x career/family) effect size, {run_dir.name}"] = round(w["effect_size"], 3)
        numbers[f"WEAT 6 permutation p-value, {run_dir.name}"] = round(w["p_value"], 4)
        runs.append(str(run_dir))
    # dose-response
    rates = () if not ctx.dose else (0.0, 0.5) if ctx.budget == "quick" else (0.0, 0.1, 0.3, 0.5)
    dose_rows = []
    dose_runs = toy.train_many([dict(out=ctx.work / f"bias-{int(rate * 100)}",
                                     docs=gen.planted_bias_corpus(rate, n_sentences=12000), steps=ctx.b["bias_steps"],
                                     context=64, batch_tokens=ctx.b["batch_tokens"]) for rate in rates],
                               threads=ctx.threads, log=ctx.log)
    for rate, d in zip(rates, dose_runs):
        runs.append(str(d))
        model, tok = toy.load(d)
        m = {"part": "dose", "planted_rate": rate, **dose_measures(model, tok)}
        rows.append(m)
        dose_rows.append(m)
        numbers[f"template gap P(he) male- minus female-coded, planted {rate:.0%}"] = output.fmt_ci(
            m["template_gap"], (m["gap_lo"], m["gap_hi"]))
        numbers[f"CrowS stereotype preference, planted {rate:.0%}"] = output.fmt_ci(
            m["crows_stereo"], (m["crows_lo"], m["crows_hi"]))
        numbers[f"WEAT occupations x he/she, planted {rate:.0%}"] = f"d={m['weat_d']:.2f}, p={m['weat_p']:.3f}"
    output.write_points(ctx.out, rows)
    plots = []
    if dose_rows:
        plots.append(_plot_dose(ctx, dose_rows))
        notes += verdict.dose(dose_rows)
    else:
        notes.append("The planted-bias dose-response was not run (--no-dose).")
    return output.write_result(
        ctx.out, suite="bias", title="Bias: WEAT, templates, CrowS-style pairs, planted dose",
        what=(f"WEAT 6 on each given run; decoders (d_model 64, 2 layers, {ctx.b['bias_steps']} steps) trained on 12,000 "
              f"generated occupation/pronoun sentences with the stereotype planted at "
              f"{', '.join(f'{x:.0%}' for x in rates) or '(not run)'}."),
        numbers=numbers, plots=plots, notes=notes, runs=runs, seconds=time.time() - t0, command=ctx.command)


def _plot_dose(ctx: EvalContext, dose_rows: list[dict]) -> str:
    fig, ax = output.figure(figsize=(5.5, 3.8))
    r = [x["planted_rate"] for x in dose_rows]
    ax.errorbar(r, [x["template_gap"] for x in dose_rows], yerr=output.errbars(
        [x["template_gap"] for x in dose_rows], [(x["gap_lo"], x["gap_hi"]) for x in dose_rows]), marker="o",
        capsize=3, label="template gap in P(he)")
    ax.errorbar(r, [x["crows_stereo"] - 0.5 for x in dose_rows], yerr=output.errbars(
        [x["crows_stereo"] for x in dose_rows], [(x["crows_lo"], x["crows_hi"]) for x in dose_rows]), marker="s",
        capsize=3, label="CrowS stereotype preference - 0.5")
    ax.plot([0, 0.5], [0, 0.5], "k:", lw=1, label="ideal template gap = rate")
    ax.set_xlabel("planted rate")
    ax.legend(fontsize=7)
    return output.save(fig, ctx.out / "bias_dose.png")
