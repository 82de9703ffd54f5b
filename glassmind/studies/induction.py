"""Ground truth for the autopsy: a model trained where the mechanism is known must show it.

    python -m glassmind.studies.induction --out runs/induction          (a few CPU minutes)
    python -m glassmind.studies.induction --out /tmp/ind --budget tiny  (seconds: a smoke test)

The task: a random segment r of random length m, repeated to fill the row. The first m tokens cannot be
predicted (chance: 1 / (vocab - 1)); the rest can, only by looking back: find the earlier occurrence of
the current token and copy the token after it. A two-layer model does this with an induction head (Olsson et
al. 2022, "In-context Learning and Induction Heads"): a previous-token head in layer 0 writes "my previous
token was A" into each position; a head in layer 1 matches its query (the current token A) against those keys
and copies the value of the position after the earlier A.

The run keeps log-spaced checkpoints (step 1, 2, 4, ... more densely late), because the induction head forms
abruptly (their "phase change") and a linear schedule would step over it. The analysis then uses only the
autopsy's tools from outside the model:

    1. detectors (glassmind.autopsy.causal.head_scores) find the induction and previous-token heads;
    2. zero-ablating the induction heads the detector finds drops copy accuracy to near chance, while
       ablating a random head of the same layer outside the circuit (neither an induction nor a
       previous-token head), or a random set of as many heads outside it, does not; every head's ablation
       alone is listed. The result names the mechanism: "one head" when ablating the detector's top head
       alone already reaches near chance, else "a set of k heads". With 4 heads per layer the model grows
       several induction heads, redundantly (ablating any one alone leaves most of the copying), so the set is
       what is ablated (a 1-head-per-layer model, in one exploratory run, grew a single one whose ablation
       reached chance, but such a model has no head left in that layer to serve as the control);
    3. across checkpoints, the induction score forms (first checkpoint past the midpoint of its rise) inside
       the window where the copy loss drops most steeply (between two consecutive log-spaced checkpoints).

Writes RUN/config.json, model.safetensors, tokenizer.json (words w1..w{V-1}, so `glassmind autopsy` can read
prompts), checkpoints/step_XXXXXX/, metrics.jsonl, induction.json (every number) and induction.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from glassmind.common import (GlassmindError, add_config_args, append_jsonl, atomic_write_json, atomic_write_text,
                              config_from_args, run_main)
from glassmind.model import ModelConfig, Transformer
from glassmind.model import load_model, save_model
from glassmind.train.optim import adamw
from glassmind.train.schedule import lr_at
from glassmind.autopsy.causal import ablation_edit, best_head, head_scores
from glassmind.autopsy.hooks import hooked

# tiny: a smoke test in seconds (too short to form the head); its model and checkpoints are small too
BUDGETS = {"small": dict(steps=1500, batch=32), "tiny": dict(steps=30, batch=8, d_model=32, half=6, checkpoints=4)}


@dataclass
class InductionConfig:
    out: str = field(default="runs/induction", metadata={"help": "run directory to write"})
    budget: str = field(default="small", metadata={"help": "small (a few CPU minutes) | tiny (seconds)",
                                                    "choices": tuple(BUDGETS)})
    vocab: int = field(default=64, metadata={"help": "tokens 1..vocab-1 are drawn; 0 is [UNK]"})
    half: int = field(default=16, metadata={"help": "sequences are 2*half long; the repeated segment is at most half"})
    d_model: int = field(default=128, metadata={"help": "model width (64 leaves too little room beside the token "
                                                         "for the previous-token information; it stalls)"})
    n_heads: int = field(default=4, metadata={"help": "heads per layer (several L1 heads become induction heads, "
                                                        "redundantly: the analysis ablates the detected set; a "
                                                        "head of that layer outside it is the control)"})
    n_layers: int = field(default=2, metadata={"help": "layers (2 is the smallest that can form induction)"})
    positional: str = field(default="rope", metadata={"help": "rope makes 'the previous position' one learned "
                                                              "rotation for every position; learned | rope"})
    steps: int = field(default=0, metadata={"help": "training steps (0: the budget's)"})
    batch: int = field(default=0, metadata={"help": "sequences per step (0: the budget's)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW, cosine decay to a tenth of it)"})
    schedule_steps: int = field(default=0, metadata={"help": "length of the lr schedule (0: --steps); with the "
                                                             "default's length, a shorter run is the first steps "
                                                             "of the default run exactly (the CI test's run)"})
    checkpoints: int = field(default=16, metadata={"help": "log-spaced checkpoints kept"})
    eval_every: int = field(default=25, metadata={"help": "copy metrics into metrics.jsonl every this many steps "
                                                          "(0: only at the checkpoints)"})
    seed: int = field(default=0, metadata={"help": "seed of the data and the initialisation"})
    threads: int = field(default=1, metadata={"help": "torch threads (a model this small gains nothing from more)"})
    progress: bool = field(default=True, metadata={"help": "print progress lines"})


def batch_of(n: int, half: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, 2*half), copyable (n, 2*half) bool). Each row repeats a random segment of random period m in
    [half/4, half] until the row is full (Olsson et al.'s "repeated random tokens", with the period drawn
    per row: a fixed period would let a head copy by position alone, attending to q - m + 1, which is not
    induction). copyable[i, t]: the next token ids[i, t+1] can be found by induction (t >= m: the current
    token has occurred once before)."""
    T = 2 * half
    ids = torch.empty(n, T, dtype=torch.long)
    copyable = torch.zeros(n, T, dtype=torch.bool)
    periods = torch.randint(max(2, half // 4), half + 1, (n,), generator=g)
    for i in range(n):
        m = int(periods[i])
        r = torch.randint(1, vocab, (m,), generator=g)
        ids[i] = r.repeat(T // m + 1)[:T]
        copyable[i, m:T - 1] = True
    return ids, copyable


@torch.no_grad()
def copy_metrics(model: Transformer, batch: tuple[torch.Tensor, torch.Tensor], edits: dict | None = None
                 ) -> dict[str, float]:
    """Accuracy and loss (nats) of predicting the copyable tokens (see batch_of)."""
    ids, copyable = batch
    with hooked(model, (), edits or {}):
        logits = model(ids)                                                             # (N, T, V)
    mask = copyable[:, :-1]
    pred, tgt = logits[:, :-1][mask], ids[:, 1:][mask]
    return {"copy_accuracy": float((pred.argmax(-1) == tgt).float().mean()),
            "copy_loss": float(F.cross_entropy(pred, tgt))}


def log_steps(total: int, n: int) -> list[int]:
    """n checkpoint steps spaced evenly in log(step) from 1 to total (distinct, sorted)."""
    return sorted({max(1, round(math.exp(math.log(total) * i / (n - 1)))) for i in range(n)} | {total})


def tokenizer_for(vocab: int):
    from glassmind.tokenizer.wordpiece import WordPieceTokenizer

    return WordPieceTokenizer.of_words(["[UNK]"] + [f"w{i}" for i in range(1, vocab)])


def train(cfg: InductionConfig) -> Path:
    if cfg.budget not in BUDGETS:
        raise GlassmindError(f"budget {cfg.budget!r}: use one of {', '.join(BUDGETS)}")
    if cfg.n_layers < 2:
        raise GlassmindError("an induction head needs two layers (a previous-token head feeds it): --n-layers 2")
    steps = cfg.steps or BUDGETS[cfg.budget]["steps"]
    batch = cfg.batch or BUDGETS[cfg.budget]["batch"]
    sched = cfg.schedule_steps or steps
    if sched < steps:
        raise GlassmindError(f"--schedule-steps {sched} is shorter than --steps {steps}: make it >= steps or 0")
    out = Path(cfg.out)
    if (out / "model.safetensors").exists():
        raise GlassmindError(f"{out} already holds a run: pass another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mcfg = ModelConfig(arch="decoder", vocab_size=cfg.vocab, context_length=2 * cfg.half, d_model=cfg.d_model,
                       n_heads=cfg.n_heads, n_layers=cfg.n_layers, positional=cfg.positional, dropout=0.0)
    model = Transformer(mcfg)
    opt = adamw(model, lr=cfg.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed)
    eval_ids = batch_of(256, cfg.half, cfg.vocab, torch.Generator().manual_seed(10_000 + cfg.seed))
    keep = set(log_steps(steps, cfg.checkpoints))
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    tokenizer_for(cfg.vocab).save(out)
    t0 = time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, max_lr=cfg.lr, total_steps=sched, warmup_steps=min(50, sched // 10))
        ids, _ = batch_of(batch, cfg.half, cfg.vocab, g)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in keep or (cfg.eval_every and step % cfg.eval_every == 0):
            model.eval()
            m = copy_metrics(model, eval_ids)
            model.train()
            append_jsonl(metrics, {"step": step, "loss": float(loss.detach()), **m})
            if step in keep:
                save_model(model, out / "checkpoints" / f"step_{step:06d}")
            if cfg.progress and (step in keep or step % 250 == 0):
                print(f"  step {step:5d}/{steps}  loss {float(loss.detach()):.3f}  copy acc {m['copy_accuracy']:.3f}  "
                      f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    save_model(model, out)
    atomic_write_json(out / "study.json", {"config": asdict(cfg), "steps": steps, "batch": batch,
                                           "seconds": time.time() - t0})
    return out


def checkpoints_of(run: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.name.split("_")[1]), p) for p in (run / "checkpoints").glob("step_*")
                  if (p / "model.safetensors").exists())


NEAR_CHANCE = 0.06  # copy accuracy at most this far above chance (0.016) counts as "near chance"


def detected(scores: list[list[float]], frac: float = 0.6, floor: float = 0.2) -> list[tuple[int, int]]:
    """Heads scoring at least `frac` of the best score and at least `floor` (uniform attention over the
    ~32 keys scores ~0.03-0.1), best first: a model may grow several. frac 0.6, not 0.5: the default run's
    L1.H0 scores 0.37 against the best head's 0.67 (step 750) and 0.77 (step 1500), a partial head whose
    ablation alone costs under 0.01 of copy accuracy; 0.5 counted it in at step 750. None qualifying (an untrained model):
    the best head alone, so the analysis still runs (and shows no effect)."""
    ranked = sorted(((v, l, h) for l, row in enumerate(scores) for h, v in enumerate(row)), reverse=True)
    best = ranked[0][0]
    heads = [(l, h) for v, l, h in ranked if v >= max(frac * best, floor)]
    return heads or [(ranked[0][1], ranked[0][2])]


def combined_ablation(model: Transformer, heads: list[tuple[int, int]], mode: str = "zero") -> dict:
    """One edit dict ablating several heads (edits on the same hook compose)."""
    edits: dict = {}
    for l, h in heads:
        for key, fn in ablation_edit(model, f"L{l}.H{h}", mode).items():
            prev = edits.get(key)
            edits[key] = fn if prev is None else (lambda v, f=fn, g=prev: f(g(v)))
    return edits


def analyse(run: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """The three claims of the module docstring, measured; returns every number."""
    run = Path(run)
    study = json.loads((run / "study.json").read_text())["config"]
    half, vocab = study["half"], study["vocab"]
    model = load_model(run).eval()
    eval_ids = batch_of(256, half, vocab, torch.Generator().manual_seed(20_000 + seed))  # fresh sequences
    scores = head_scores(model, half=half, n_seqs=32, seed=seed, vocab=range(1, vocab))
    il, ih, iscore = best_head(scores["induction"])
    pl, ph, pscore = best_head(scores["previous_token"])
    induction_heads = detected(scores["induction"])
    prev_heads = detected(scores["previous_token"])
    heads = [(l, h) for l in range(model.config.n_layers) for h in range(model.config.n_heads)]
    # the control: heads of the same layer(s) as the detected induction heads that are in neither detected
    # set (a previous-token head is part of the circuit: ablating it must hurt, so it is no control)
    layers = {l for l, _ in induction_heads}
    circuit = set(induction_heads) | set(prev_heads)
    others = [x for x in heads if x[0] in layers and x not in circuit]
    outside = [x for x in heads if x not in circuit and x not in others]
    if not others and not outside:
        raise GlassmindError("every head is an induction or previous-token head, so no control head exists: "
                             "train with more heads (--n-heads)")
    rng = random.Random(seed)
    # the control head: one of the same layer outside the circuit; a head of another layer only when the
    # layer has none (then random_other_head.same_layer is false and the study's claim is not met)
    rl, rh = rng.choice(others or outside)
    # a random set as large as the detected one: the same layer's other heads first, then (when the layer
    # has too few) heads of other layers outside the circuit
    k = min(len(induction_heads), len(others) + len(outside))
    control_set = sorted(rng.sample(others, min(k, len(others))) + rng.sample(outside, k - min(k, len(others))))
    base = copy_metrics(model, eval_ids)
    # Zero ablation. Mean ablation over a sequence's positions would keep, in every head's output, the
    # average of what it copied: in a periodic sequence that is a bag of the context's own tokens, which
    # alone lifts copy accuracy far above chance (0.37 with the three induction heads mean-ablated in a
    # 4-head run)
    per_head = {f"L{l}.H{h}": copy_metrics(model, eval_ids, ablation_edit(model, f"L{l}.H{h}", "zero"))
                for l, h in heads}
    together = copy_metrics(model, eval_ids, combined_ablation(model, induction_heads))
    control = copy_metrics(model, eval_ids, combined_ablation(model, control_set))
    chance = 1.0 / (vocab - 1)
    # one head or a set: the mechanism is "one head" when ablating the detector's top head alone takes
    # copy accuracy within NEAR_CHANCE of chance; otherwise the detected set is the unit that is ablated
    alone = per_head[f"L{il}.H{ih}"]["copy_accuracy"]
    if base["copy_accuracy"] <= chance + NEAR_CHANCE:  # nothing to find (an untrained or tiny-budget model)
        mechanism = "none (the model does not copy: its accuracy is already near chance)"
    else:
        mechanism = "one head" if alone <= chance + NEAR_CHANCE else f"a set of {len(induction_heads)} heads"
    # across checkpoints: the induction heads' score and the copy loss
    rows = []
    for step, path in checkpoints_of(run):
        m = load_model(path).eval()
        s = head_scores(m, half=half, n_seqs=16, seed=seed, vocab=range(1, vocab))
        rows.append({"step": step, "induction_score": s["induction"][il][ih],
                     "max_induction_score": max(max(r) for r in s["induction"]),
                     **copy_metrics(m, eval_ids)})
    formation = _crossing([r["induction_score"] for r in rows], rising=True)
    loss_drop = _crossing([r["copy_loss"] for r in rows], rising=False)
    window = _window([r["copy_loss"] for r in rows])
    return {
        "induction_head": {"layer": il, "head": ih, "score": iscore},
        "induction_heads": [f"L{l}.H{h}" for l, h in induction_heads],
        "previous_token_head": {"layer": pl, "head": ph, "score": pscore},
        "previous_token_heads": [f"L{l}.H{h}" for l, h in prev_heads],
        "scores": scores, "chance": chance, "copy_accuracy": base["copy_accuracy"],
        "copy_accuracy_without_induction_head": per_head[f"L{il}.H{ih}"]["copy_accuracy"],
        "copy_accuracy_without_induction_heads": together["copy_accuracy"],
        "mechanism": mechanism,
        "random_other_head": {"layer": rl, "head": rh, "same_layer": bool(others),
                              "chosen_from": [f"L{l}.H{h}" for l, h in others or outside],
                              "copy_accuracy_without_it": per_head[f"L{rl}.H{rh}"]["copy_accuracy"]},
        "random_other_set": {"heads": [f"L{l}.H{h}" for l, h in control_set],
                             "copy_accuracy_without_them": control["copy_accuracy"]},
        "ablation_per_head": per_head, "checkpoints": rows,
        "formation_step": rows[formation]["step"] if formation is not None else None,
        "loss_drop_step": rows[loss_drop]["step"] if loss_drop is not None else None,
        "loss_drop_window": [rows[window[0]]["step"], rows[window[1]]["step"]] if window is not None else None,
        "checkpoint_steps": [r["step"] for r in rows],
    }


def _crossing(values: list[float], *, rising: bool) -> int | None:
    """Index of the first checkpoint past the midpoint between the first and the last value: where a curve
    that changes once (a phase change) changes."""
    if len(values) < 2:
        return None
    mid = (values[0] + values[-1]) / 2
    for i, v in enumerate(values):
        if (v >= mid) if rising else (v <= mid):
            return i
    return None


def _window(loss: list[float]) -> tuple[int, int] | None:
    """(i-1, i): the two consecutive checkpoints between which the copy loss falls most. The checkpoints are
    log-spaced, so this is the steepest drop per log(step): the phase change, not the slow early slide
    (learning which tokens occur in the row at all) that precedes it."""
    if len(loss) < 2:
        return None
    i = max(range(1, len(loss)), key=lambda j: loss[j - 1] - loss[j])
    return (i - 1, i) if loss[i] < loss[i - 1] else None


def in_window(result: dict[str, Any]) -> bool:
    """Whether the induction score's formation step lies inside the copy loss's drop window."""
    w, f = result["loss_drop_window"], result["formation_step"]
    return w is not None and f is not None and w[0] <= f <= w[1]


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["checkpoints"]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, [r["copy_loss"] for r in rows], "o-", color="tab:red", label="copy loss (nats)")
    ax.set_xscale("log")
    ax.set_xlabel("training step (log-spaced checkpoints)")
    ax.set_ylabel("copy loss (nats)", color="tab:red")
    ax2 = ax.twinx()
    ih = result["induction_head"]
    ax2.plot(steps, [r["induction_score"] for r in rows], "s-", color="tab:blue",
             label=f"induction score of L{ih['layer']}.H{ih['head']}")
    ax2.set_ylabel("induction score", color="tab:blue")
    if result["formation_step"]:
        ax.axvline(result["formation_step"], color="gray", ls="--", lw=1, label="induction score formed")
    if result.get("loss_drop_window"):
        ax.axvspan(*result["loss_drop_window"], color="tab:red", alpha=0.12, label="steepest copy-loss drop")
    ax.set_title("The induction heads form as the copy loss drops")
    fig.legend(loc="lower left", bbox_to_anchor=(0.12, 0.22), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_lines(r: dict[str, Any]) -> list[str]:
    ih, ph, rh = r["induction_head"], r["previous_token_head"], r["random_other_head"]
    return [
        f"induction head: L{ih['layer']}.H{ih['head']} (score {ih['score']:.2f}), all detected: "
        f"{', '.join(r['induction_heads'])}; previous-token head: L{ph['layer']}.H{ph['head']} (score "
        f"{ph['score']:.2f}), all detected: {', '.join(r['previous_token_heads'])}",
        f"copy accuracy {r['copy_accuracy']:.3f} (chance {r['chance']:.3f}); zero-ablating "
        f"L{ih['layer']}.H{ih['head']} alone -> {r['copy_accuracy_without_induction_head']:.3f}; all detected "
        f"induction heads together -> {r['copy_accuracy_without_induction_heads']:.3f}; a random other head of "
        f"{'the same' if rh['same_layer'] else 'another'} layer L{rh['layer']}.H{rh['head']} (from {', '.join(rh['chosen_from'])}) -> "
        f"{rh['copy_accuracy_without_it']:.3f}; a random set of as many ({', '.join(r['random_other_set']['heads'])})"
        f" -> {r['random_other_set']['copy_accuracy_without_them']:.3f}; the mechanism: {r['mechanism']}",
        f"the induction score forms at step {r['formation_step']}, the copy loss drops at step "
        f"{r['loss_drop_step']} (its steepest drop is between checkpoints {r['loss_drop_window']}; "
        f"formation {'inside' if in_window(r) else 'outside'} it; checkpoints {r['checkpoint_steps']})",
    ]


def write_outputs(out: Path, result: dict[str, Any], command: str) -> None:
    """The studies' conventions: every number (induction.json), a CSV of every point (checkpoints.csv: one row
    per checkpoint; ablation.csv: copy accuracy and loss with each head zero-ablated alone), the plot, and
    card.md with the read-out and the command that made it."""
    from glassmind.studies.sweep import write_csv

    atomic_write_json(out / "induction.json", result)
    plot(result, out / "induction.png")
    write_csv(out / "checkpoints.csv", result["checkpoints"])
    write_csv(out / "ablation.csv", [{"ablated": k, **v} for k, v in result["ablation_per_head"].items()])
    card = ["# induction: ground truth for the autopsy", "", "Made by:", "", "    " + command, "",
            "![induction.png](induction.png)", "", "```", *summary_lines(result), "```", ""]
    atomic_write_text(out / "card.md", "\n".join(card))


DEMO_PROMPTS = [  # (prompt, the continuation's first token as text): code the demo decoder has read
    ("def __init__(self", ","), ("import os\nimport", " sys"), ("    def __init__(self", ")"),
    ("if __name__ == '__main__", "':"), ("        return self", "."), ("for i in range(", "len"),
]


def demo_prompt(model, tokenizer) -> tuple[str, int, bool]:
    """The first demo prompt on which the model's top guess is the true next token: (prompt, token id,
    right?). If it is right on none, the first prompt and its true next token (and right=False)."""
    first = None
    for prompt, nxt in DEMO_PROMPTS:
        ids = tokenizer.encode(prompt)
        want = tokenizer.encode(prompt + nxt)
        if want[: len(ids)] != ids or len(want) <= len(ids):
            continue
        with torch.no_grad():
            guess = int(model(torch.tensor([ids]))[0, -1].argmax())
        first = first or (prompt, want[len(ids)], False)
        if guess == want[len(ids)]:
            return prompt, guess, True
    if first is None:
        raise GlassmindError("no demo prompt tokenizes as expected with this tokenizer")
    return first


def demo_stage(run_dir: str | Path | None, out_dir: str | Path, budget: str = "small") -> dict[str, Any]:
    """The demo's autopsy stage: (1) an autopsy report of the demo decoder `run_dir` on a prompt where it is
    right (see demo_prompt; skipped when run_dir is None), (2) the induction-head study trained at `budget`
    (small: a few CPU minutes; tiny: seconds, a smoke test whose model is too short-trained to show the
    head), analysed and plotted. Returns the key numbers."""
    from glassmind import tokenizer as tok_lib
    from glassmind.autopsy.report import AutopsyConfig, autopsy_run

    out_dir = Path(out_dir)
    summary: dict[str, Any] = {}
    if run_dir is not None:
        model = load_model(run_dir).eval()
        tok = tok_lib.load(run_dir)
        prompt, target, right = demo_prompt(model, tok)
        done = autopsy_run(run_dir, prompt, AutopsyConfig(target=f"#{target}", out=str(out_dir / "autopsy-decoder")))
        summary["decoder"] = {"prompt": prompt, "right": right, "report": str(done["report"]),
                              "narration": [s["text"] for s in done["result"]["narration"]]}
    out = out_dir / "induction"
    if not (out / "model.safetensors").exists():
        kw = {k: v for k, v in BUDGETS[budget].items() if k in ("d_model", "half", "checkpoints")}
        train(InductionConfig(out=str(out), budget=budget, progress=budget != "tiny", **kw))
    result = analyse(out)
    write_outputs(out, result, "glassmind demo (stage 5: glassmind.studies.induction.demo_stage, budget "
                  f"{budget})")
    summary["induction"] = {"run": str(out), "summary": summary_lines(result),
                            **{k: result[k] for k in ("induction_head", "copy_accuracy",
                                                      "copy_accuracy_without_induction_head", "random_other_head",
                                                      "copy_accuracy_without_induction_heads", "induction_heads",
                                                      "random_other_set", "mechanism", "formation_step",
                                                      "loss_drop_step", "loss_drop_window", "chance")}}
    return summary


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="glassmind study induction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, InductionConfig)
    p.add_argument("--analyse-only", action="store_true", help="analyse an existing run in --out, do not train")
    ns = p.parse_args(argv)
    cfg = config_from_args(InductionConfig, ns)
    out = Path(cfg.out)
    if not ns.analyse_only:
        train(cfg)
    elif not (out / "study.json").exists():
        raise GlassmindError(f"{out} holds no induction run: drop --analyse-only to train one")
    result = analyse(out, seed=cfg.seed)
    from glassmind.studies.sweep import command_line

    write_outputs(out, result, command_line("induction", sys.argv[1:] if argv is None else argv))
    for line in summary_lines(result):
        print(line)
    print(f"wrote {out / 'induction.json'}, induction.png, checkpoints.csv, ablation.csv and card.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
