"""The narrated account: sentences from templates, each with the measured numbers it states.

Rules (the issue's, enforced by tests/test_autopsy.py):
  - every sentence is a template filled from the autopsy's JSON; its `numbers` hold every value it states;
  - causal verbs ("causes", "drops", "is needed", "restores") appear only in sentences of kind "causal", and
    those are generated only from an ablation or a patch; attribution and attention are described with
    correlational verbs ("writes", "attends", "looks like");
  - the same JSON gives the same text (no sampling, no dict-order dependence beyond the JSON's own lists).
No language model writes any of it.
"""

from __future__ import annotations

import math
from typing import Any

CAUSAL_WORDS = ("cause", "drops", "needed", "restores", "raises")
EFFECT = 0.1   # nats: an ablation that moves log p(target) less than this is "no effect" (exp(0.1) ~ 1.1x)


def _q(s: str) -> str:
    return "'" + s.replace("\n", "\\n") + "'"


def _p(x: float) -> str:
    return f"{x:.2f}" if x >= 0.01 else f"{x:.1e}"


def sentence(text: str, kind: str, **numbers: Any) -> dict[str, Any]:
    return {"text": text, "kind": kind, "numbers": numbers}


def narrate(r: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    t = r["target"]
    tq = _q(t["piece"])
    top_piece, top_prob = r["prediction"][0]
    where = ("at the masked position " + str(r["position"]) if r["arch"] == "encoder"
             else f"after {_q(r['context_tail'])}")
    if r.get("readout") == "embedding":
        where += " (read against the token embeddings: this encoder has no MLM head)"
    if t["rank"] == 1:
        out.append(sentence(f"The model predicts {tq} {where} with probability {_p(t['prob'])}.", "observation",
                            prob=t["prob"], rank=1))
    else:
        out.append(sentence(f"The target {tq} has probability {_p(t['prob'])} {where} (rank {t['rank']}); the "
                            f"model's top guess is {_q(top_piece)} ({_p(top_prob)}).", "observation",
                            prob=t["prob"], rank=t["rank"], top_prob=top_prob))

    # the lens: where the target first becomes, and stays, the top guess
    rows = r["lens_rows"]
    col = r["lens_position_index"]
    ranks = [r["lens"][l][col]["target_rank"] for l in range(len(rows))]
    n = len(rows) - 1
    first = next((l for l in range(len(rows)) if all(k == 1 for k in ranks[l:])), None)
    if first is None:
        out.append(sentence(f"Through the logit lens {tq} is never the top guess; at the output its rank is "
                            f"{ranks[-1]}.", "observation", final_rank=ranks[-1]))
    elif first == 0:
        out.append(sentence(f"Through the logit lens {tq} is already the top guess from the embeddings "
                            f"(probability {_p(r['lens'][0][col]['target_prob'])}).", "observation",
                            layer=0, prob=r["lens"][0][col]["target_prob"]))
    else:
        p_at = r["lens"][first][col]["target_prob"]
        out.append(sentence(f"Through the logit lens {tq} becomes the top guess at layer {first} of {n} "
                            f"(probability {_p(p_at)} there).", "observation", layer=first, of=n, prob=p_at))

    # direct attribution: who writes toward the target
    comps = [c for c in r["attribution"] if c["component"] != "rest"]
    if comps:
        ranked = sorted(comps, key=lambda c: (-c["value"], c["component"]))
        best = ranked[0]
        extra = ""
        nums: dict[str, Any] = {"component": best["component"], "direct_logit": best["value"]}
        focus = r.get("head_focus", {}).get(best["component"])
        if focus is not None:
            extra = f", attending most to {_q(focus['piece'])} (attention {focus['weight']:.2f})"
            nums["attention"] = focus["weight"]
        how = "" if r.get("attribution_exact", True) else " (linearised through the MLM head)"
        nxt = ", ".join(f"{c['component']} ({c['value']:+.2f})" for c in ranked[1:3])
        out.append(sentence(f"{best['component']} writes most directly toward {tq}{how}: direct logit "
                            f"contribution {best['value']:+.2f}{extra}; next {nxt}.", "observation", **nums,
                            next=[[c["component"], c["value"]] for c in ranked[1:3]]))

    # ablation: the only source of causal claims besides patching
    abl = r.get("ablation") or []
    if abl:
        worst = min(abl, key=lambda a: (a["logprob_after"] - a["logprob_before"], a["component"]))
        d = worst["logprob_after"] - worst["logprob_before"]
        p0, p1 = math.exp(worst["logprob_before"]), math.exp(worst["logprob_after"])
        if d <= -EFFECT:
            out.append(sentence(f"Ablating {worst['component']} ({worst['mode']} ablation) drops p({tq}) from "
                                f"{_p(p0)} to {_p(p1)}: it is needed for this prediction.", "causal",
                                component=worst["component"], logprob_before=worst["logprob_before"],
                                logprob_after=worst["logprob_after"]))
        else:
            out.append(sentence(f"No single head or FFN is needed: ablating any one of {len(abl)} moves "
                                f"log p({tq}) by at most {abs(d):.2f} nats.", "causal", components=len(abl),
                                largest_change=d))
        if comps:
            best = max(comps, key=lambda c: (c["value"], c["component"]))
            row = next((a for a in abl if a["component"] == best["component"]), None)
            if row is not None and row["component"] != worst["component"]:
                db = row["logprob_after"] - row["logprob_before"]
                if abs(db) < EFFECT:
                    out.append(sentence(f"Although {best['component']} writes the most toward {tq} directly, "
                                        f"ablating it moves log p only by {db:+.2f} nats.", "causal",
                                        component=best["component"], logprob_before=row["logprob_before"],
                                        logprob_after=row["logprob_after"]))

    # patching
    pat = r.get("patching") or []
    if pat and abs(pat[0]["logprob_clean"] - pat[0]["logprob_corrupted"]) < EFFECT:
        p = pat[0]
        out.append(sentence(f"The corrupted prompt changes log p({tq}) by only "
                            f"{p['logprob_corrupted'] - p['logprob_clean']:+.2f} nats, too little to patch.",
                            "observation", logprob_clean=p["logprob_clean"], logprob_corrupted=p["logprob_corrupted"]))
    elif pat:
        best = max(pat, key=lambda p: (p["restored"], p["component"]))
        out.append(sentence(f"Patching {best['component']} from the clean prompt into the corrupted one "
                            f"restores {best['restored']:.0%} of the gap in log p({tq}) "
                            f"({best['logprob_corrupted']:.2f} -> {best['logprob_patched']:.2f}; clean "
                            f"{best['logprob_clean']:.2f}).", "causal", component=best["component"],
                            logprob_corrupted=best["logprob_corrupted"], logprob_patched=best["logprob_patched"],
                            logprob_clean=best["logprob_clean"], restored=best["restored"]))

    # detectors
    det = r.get("detectors")
    if det:
        for kind, label, thr in (("induction", "an induction head", 0.3), ("previous_token", "a previous-token head",
                                                                             0.5)):
            scores = det[kind]
            v, l, h = max((v, l, h) for l, row in enumerate(scores) for h, v in enumerate(row))
            if v >= thr:
                out.append(sentence(f"L{l}.H{h} looks like {label} (score {v:.2f} on repeated random tokens).",
                                    "observation", component=f"L{l}.H{h}", score=v))
    return out


def has_causal_verb(text: str) -> bool:
    low = text.lower()
    return any(w in low for w in CAUSAL_WORDS)
