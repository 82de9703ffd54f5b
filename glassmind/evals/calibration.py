"""Calibration on the verifiable tasks: is a model's confidence in its answer the chance it is right?

For each chat run given (an SFT, DPO, PPO or GRPO run; several runs = several lifecycle stages, in the
order given): greedy replies to the built-in tasks' held-out prompts (glassmind.data.tasks), judged by the
verifier (exact match). Confidence = the model's probability of its whole reply, <|end|> included
(exp of the summed token log-probabilities, teacher-forced). Expected calibration error over 10 equal-width
bins (glassmind.evals.stats.ece) with a bootstrap interval, and a reliability diagram per run.

A pre-trained run (no chat tokens) does not apply: the few-shot variant is not built; use
`--suite hallucination` for a base model's calibration on facts of known exposure.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from glassmind.common import GlassmindError
from glassmind.evals import output
from glassmind.evals.context import EvalContext
from glassmind.evals.stats import bootstrap_ci, ece, reliability

BINS = 10


def is_chat_run(run: Path) -> bool:
    import json

    tok = run / "tokenizer.json"
    return tok.exists() and "<|assistant|>" in tok.read_text(encoding="utf-8")


@torch.no_grad()
def reply_logprobs(model, prompts: list[list[int]], replies: list[list[int]], batch_size: int = 128) -> list[float]:
    out = []
    ctx = model.config.context_length
    for s in range(0, len(prompts), batch_size):
        rows = [(list(p) + list(r))[-ctx:] for p, r in zip(prompts[s:s + batch_size], replies[s:s + batch_size])]
        ns = [len(r) for r in replies[s:s + batch_size]]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
        logp = torch.log_softmax(model(ids).float(), -1)
        for j, (r, n) in enumerate(zip(rows, ns)):
            if n == 0:
                out.append(0.0)
                continue
            L = len(r)
            out.append(logp[j, L - n - 1:L - 1].gather(1, torch.tensor(r[L - n:])[:, None]).sum().item())
    return out


def measure(run: Path, per_task: int) -> dict:
    from glassmind.data import tasks as task_lib
    from glassmind.train.chat_runs import generate, load_chat_run

    model, tok, fmt = load_chat_run(run, flag="RUN")
    examples = task_lib.heldout_examples(per_task)
    prompts = [fmt.render_prompt(e.messages()[:1]) for e in examples]
    replies = generate(model, prompts, fmt.end_id, max_new_tokens=16)
    conf = np.exp(reply_logprobs(model, prompts, replies))
    ok = np.array([task_lib.verify(e, fmt.parse_reply(r)) for e, r in zip(examples, replies)])
    tasks = [e.task for e in examples]
    return {"confidence": conf, "correct": ok, "tasks": tasks}


def check(runs) -> None:
    """Refuse, before any work or output, runs this suite does not apply to."""
    if not runs:
        raise GlassmindError("--suite calibration needs RUN: one or more chat runs (sft, dpo, ppo, grpo), in "
                             "lifecycle order")
    not_chat = [str(r) for r in runs if not is_chat_run(r)]
    if not_chat:
        raise GlassmindError(f"--suite calibration applies to chat runs (sft, dpo, ppo, grpo); {', '.join(not_chat)} "
                             "has no chat tokens. For a pre-trained model use --suite hallucination (calibration "
                             "on facts of known exposure) or --suite bias")


def run(ctx: EvalContext) -> dict:
    t0 = time.time()
    check(ctx.runs)
    per_task = ctx.b["probes"] * 2
    rows, numbers, results = [], {}, []
    for run_dir in ctx.runs:
        ctx.log(f"  {run_dir}: {per_task} held-out prompts per task")
        m = measure(run_dir, per_task)
        both = np.stack([m["confidence"], m["correct"]], 1)
        e = ece(m["confidence"], m["correct"], BINS)
        ci = bootstrap_ci(both, lambda a: ece(a[:, 0], a[:, 1], BINS), n_boot=500)
        stage = run_dir.name
        results.append((stage, m, e, ci))
        for b in reliability(m["confidence"], m["correct"], BINS):
            rows.append({"run": str(run_dir), "stage": stage, **b})
        numbers[f"ECE, {stage}"] = output.fmt_ci(e, ci)
        numbers[f"accuracy, {stage}"] = float(m["correct"].mean())
        numbers[f"mean confidence, {stage}"] = float(m["confidence"].mean())
    output.write_points(ctx.out, rows)
    fig, axes = output.figure(1, len(results), figsize=(3.8 * len(results), 3.8), squeeze=False)
    for ax, (stage, m, e, ci) in zip(axes[0], results):
        rel = [b for b in reliability(m["confidence"], m["correct"], BINS) if b["count"]]
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in rel], [b["accuracy"] for b in rel], width=1 / BINS,
               edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        ax.set_title(f"{stage}: ECE {e:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", fontsize=9)
        ax.set_xlabel("confidence (probability of the reply)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy in bin")
    axes[0][0].legend(fontsize=7)
    plots = [output.save(fig, ctx.out / "reliability.png")]
    return output.write_result(
        ctx.out, suite="calibration", title="Calibration on the verifiable tasks",
        what=(f"Greedy replies to {per_task} held-out prompts per built-in task; confidence = probability of the "
              f"whole reply; ECE over {BINS} equal-width bins, 95% bootstrap interval (500 resamples)."),
        numbers=numbers, plots=plots, runs=[str(r) for r in ctx.runs], seconds=time.time() - t0, command=ctx.command)
