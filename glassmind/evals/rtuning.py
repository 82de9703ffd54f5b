"""R-Tuning (Zhang et al. 2024, "R-Tuning: Instructing Large Language Models to Say 'I Don't Know'"), on
the exposure world of the hallucination suite, compared with threshold abstention of the model it starts from.

    1. split      the probed creatures go to the SFT half or the held-out half by a hash of their name (never
                  a seed), so the comparison is on facts the fine-tuning never asked about
    2. label      the base model answers every SFT-half question (its most probable color); the SFT target
                  is the color where that answer is right and "I do not know" where it is wrong (the paper's
                  certain / uncertain split of its training questions)
    3. fine-tune  `python -m glassmind sft --from BASE --data rtuning.jsonl` (the sft recipe, as a person runs it)
    4. compare    on the held-out half, both models measured by one function (selective):
                    base      answers chosen among the 8 colors; abstains where a signal (entropy, sequence
                              log-probability, sampled agreement) is below a threshold: a curve
                    R-tuned   chooses among the 8 colors and "I do not know" (each a whole reply, <|end|>
                              included); abstains where "I do not know" wins: one operating point; ranking
                              by 1 - p("I do not know") gives its curve
                  correctness and confidence come from the same 8-color distribution for both (R-tuned: its
                  colors renormalised), so the only difference measured is who decides to abstain.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from glassmind.common import atomic_write_text
from glassmind.evals import gen, toy
from glassmind.evals.stats import aurc, bootstrap_ci, coverage_curve

IDK = "I do not know."
QUESTION = "What color is {name}?"  # the built-in world's own question template (glassmind.data.tasks)


def answer_reply(name: str, color: str) -> str:
    """The reply that answers: the fact restated in the words pre-training used ('<Name> is <color>.'), so the
    small model's knowledge, stored as the continuation of '<Name> is', is what answers; the choice between
    answering and abstaining is the reply's first token."""
    return gen.fact_sentence(name, color)


def is_sft_half(name: str) -> bool:
    """A creature's facts go to the SFT set (True) or the held-out comparison (False), fixed by its name."""
    return hashlib.sha256(f"glassmind-rtuning:{name}".encode()).digest()[0] < 128


def sft_conversations(probes: Sequence[gen.Probe], base_correct: Sequence[bool]) -> list[dict]:
    """R-Tuning's training set: the question, and the answer where the base model was right, else IDK."""
    if len(probes) != len(base_correct):
        raise ValueError(f"{len(probes)} probes but {len(base_correct)} correctness flags")
    out = []
    for p, ok in zip(probes, base_correct):
        out.append({"messages": [{"role": "user", "content": QUESTION.format(name=p.condition["name"])},
                                 {"role": "assistant", "content": answer_reply(p.condition["name"], p.answer) if ok else IDK}]})
    return out


def write_sft_jsonl(path: Path, convs: Sequence[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(c) + "\n" for c in convs))


@torch.no_grad()
def reply_logprobs(model, fmt, questions: Sequence[str], replies: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """(N, K): log p(reply + <|end|> | <|user|> question <|end|> <|assistant|>) for every question x reply,
    summed over the reply's tokens. Right-padded rows: a causal model's positions never see the padding."""
    rows = []
    for q in questions:
        prompt = fmt.render_prompt([{"role": "user", "content": q}])
        for r in replies:
            rid = fmt.render_reply(r)
            rows.append((prompt + rid, len(rid)))
    out = np.zeros(len(rows))
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), T), fmt.pad_id, dtype=torch.long)
        for j, (r, _) in enumerate(chunk):
            ids[j, :len(r)] = torch.tensor(r)
        logp = torch.log_softmax(model(ids).float(), dim=-1)  # (B, T, V)
        for j, (r, n) in enumerate(chunk):
            L = len(r)
            tgt = torch.tensor(r[L - n:])
            out[s + j] = logp[j, L - n - 1:L - 1].gather(1, tgt[:, None]).sum().item()
    return out.reshape(len(questions), len(replies))


def softmax(lps: np.ndarray) -> np.ndarray:
    p = np.exp(lps - lps.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def selective(answered: Sequence[bool], correct: Sequence[bool], confidence: Sequence[float],
              confident: float = 0.5) -> dict:
    """One operating point of abstention, the same for every model: coverage (share answered), accuracy of
    the answered, and the confident-wrong rate over all questions (answered, wrong, confidence >= `confident`)."""
    a = np.asarray(answered, dtype=bool)
    c = np.asarray(correct, dtype=bool)
    conf = np.asarray(confidence, dtype=float)
    n = len(a)
    k = int(a.sum())
    return {"n": n, "answered": k, "coverage": k / n if n else float("nan"),
            "accuracy": float(c[a].mean()) if k else float("nan"), "right": int((a & c).sum()),
            "confident_wrong": float((a & ~c & (conf >= confident)).sum() / n) if n else float("nan"),
            "n_confident_wrong": int((a & ~c & (conf >= confident)).sum())}


def rtuned_decisions(lps: np.ndarray, answers: Sequence[str], colors: Sequence[str] = gen.COLORS) -> dict:
    """lps (N, len(colors) + 1), the last column IDK -> answered (p(IDK) < 1/2 over the len(colors) + 1 whole
    replies), correct and confidence (over the colors alone, as for the base model) and the abstention score
    1 - p(IDK)."""
    lps = np.asarray(lps, dtype=float)
    p_all = softmax(lps)
    p_col = softmax(lps[:, :len(colors)])
    choice = p_col.argmax(1)
    correct = np.array([colors[c] == a for c, a in zip(choice, answers)])
    # answering vs abstaining is decided where the replies part (their first token: the name or "I"), so the
    # model abstains when IDK outweighs all eight answers together, not any single one of them
    return {"answered": p_all[:, len(colors)] < 0.5, "correct": correct, "confidence": p_col.max(1),
            "score": 1 - p_all[:, len(colors)], "p_idk": p_all[:, len(colors)]}


def threshold_at_coverage(score: Sequence[float], correct: Sequence[bool], confidence: Sequence[float],
                          coverage: float) -> dict:
    """The base model's operating point answering its ceil(coverage * n) most confident questions by `score`
    (ties kept together, as glassmind.evals.stats.coverage_curve keeps them)."""
    s = np.asarray(score, dtype=float)
    n = len(s)
    k = int(np.ceil(coverage * n - 1e-9))
    if k <= 0:
        answered = np.zeros(n, dtype=bool)
    else:
        cut = np.sort(s)[::-1][k - 1]
        answered = s >= cut
    return selective(answered, correct, confidence)


def run(work: Path, base_dir: Path, probes: Sequence[gen.Probe], base_signals: dict, *, steps: int, lr: float = 1e-3,
        threads: int | None = None, log=print) -> dict:
    """Steps 1-4 on the base model `base_dir` whose answers to every probe are `base_signals` (the dict of
    glassmind.evals.hallucination.signals, rows in the order of `probes`). Returns the held-out comparison:
    per model its operating point(s), curves and areas, and the SFT set's label counts."""
    from glassmind import tokenizer as tok_lib
    from glassmind.model import load_model
    from glassmind.tokenizer.chat import ChatFormat

    names = [p.condition["name"] for p in probes]
    base_correct = np.array([p.candidates[c] == p.answer for p, c in zip(probes, base_signals["choice"])])
    train_idx = [i for i, n in enumerate(names) if is_sft_half(n)]
    held_idx = [i for i, n in enumerate(names) if not is_sft_half(n)]
    convs = sft_conversations([probes[i] for i in train_idx], base_correct[train_idx])
    data = write_sft_jsonl(Path(work) / "rtuning.sft.jsonl", convs)
    tuned_dir = toy.sft(Path(work) / "rtuned", base_dir, data, steps=steps, lr=lr, threads=threads, log=log)

    tok = tok_lib.load(tuned_dir)
    fmt = ChatFormat(tok)
    model = load_model(tuned_dir).eval()
    held = [probes[i] for i in held_idx]
    lps = np.stack([reply_logprobs(model, fmt, [QUESTION.format(name=p.condition["name"])],
                                   [answer_reply(p.condition["name"], c) for c in gen.COLORS] + [IDK])[0] for p in held])
    tuned = rtuned_decisions(lps, [p.answer for p in held])

    b_correct = base_correct[held_idx]
    b_conf = base_signals["confidence"][held_idx]
    out = {"n_sft": len(convs), "n_sft_idk": sum(c["messages"][1]["content"] == IDK for c in convs),
           "n_heldout": len(held), "sft_run": str(tuned_dir),
           "rtuned": selective(tuned["answered"], tuned["correct"], tuned["confidence"]),
           "base_all": selective(np.ones(len(held), bool), b_correct, b_conf),
           # the R-tuned model made to answer everything (its best color): what fine-tuning did to its knowledge
           "rtuned_all": selective(np.ones(len(held), bool), tuned["correct"], tuned["confidence"]),
           "exposure": np.array([p.condition["exposure"] for p in held]), "rtuned_answered": tuned["answered"],
           "curves": {}}
    cov = out["rtuned"]["coverage"]
    for name in ("entropy", "logprob", "agreement"):
        s = base_signals[name][held_idx]
        out[f"base_{name}_at_rtuned_coverage"] = threshold_at_coverage(s, b_correct, b_conf, cov)
        out["curves"][f"base, {name}"] = _curve(s, b_correct)
    out["curves"]["R-tuned, 1 - p(IDK)"] = _curve(tuned["score"], tuned["correct"])
    return out


def _curve(score, correct) -> dict:
    both = np.stack([score, correct], 1)
    ci = bootstrap_ci(both, lambda a: aurc(a[:, 0], a[:, 1].astype(bool)), n_boot=300)
    return {"curve": coverage_curve(score, correct), "aurc": aurc(score, correct), "ci": ci}

