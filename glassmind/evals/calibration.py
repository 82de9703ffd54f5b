"""Calibration on the verifiable tasks: is a model's confidence in its answer the chance it is right?

For each run given (several runs = several lifecycle stages, in the order given): greedy replies to the
built-in tasks' held-out prompts (glassmind.data.tasks), judged by the verifier (exact match).
  - a chat run (SFT, DPO, PPO, GRPO): the prompt in its chat format; the reply ends at <|end|>;
  - a pre-trained decoder (no chat tokens): 3-shot plain-text prompting (tasks.few_shot_prompts, as the
    alignment study's "base (3-shot)" column); the reply is the text up to the first newline.
Confidence = the model's probability of its whole reply, the terminator included (<|end|>, or the token that
wrote the newline), exp of the summed token log-probabilities, teacher-forced. Expected calibration error over
10 equal-width bins (glassmind.evals.stats.ece) with a bootstrap interval, and a reliability diagram per run.
Encoders and encoder-decoders do not apply.
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

    if not is_chat_run(run):
        return measure_few_shot(run, per_task)
    model, tok, fmt = load_chat_run(run, flag="RUN")
    examples = task_lib.heldout_examples(per_task)
    prompts = [fmt.render_prompt(e.messages()[:1]) for e in examples]
    replies = generate(model, prompts, fmt.end_id, max_new_tokens=16)
    conf = np.exp(reply_logprobs(model, prompts, replies))
    ok = np.array([task_lib.verify(e, fmt.parse_reply(r)) for e, r in zip(examples, replies)])
    tasks = [e.task for e in examples]
    return {"confidence": conf, "correct": ok, "tasks": tasks, "prompting": "chat"}


def cut_at_newline(tok, reply: list[int]) -> list[int]:
    """The reply's ids up to and including the first token whose text holds a newline (the answer's
    terminator, as <|end|> is a chat reply's); all of them if none does."""
    for i, t in enumerate(reply):
        if "\n" in tok.decode([t]):
            return list(reply[:i + 1])
    return list(reply)


def measure_few_shot(run: Path, per_task: int, shots: int = 3, max_new_tokens: int = 12) -> dict:
    """A pre-trained decoder, prompted 3-shot in plain text (no chat format to use)."""
    from glassmind import tokenizer as tok_lib
    from glassmind.data import tasks as task_lib
    from glassmind.model import load_model
    from glassmind.train.chat_runs import generate

    model, tok = load_model(run).eval(), tok_lib.load(run)
    eos = tok.special_tokens.get("<|endoftext|>", -1)
    examples = task_lib.heldout_examples(per_task)
    keep = model.config.context_length - max_new_tokens
    prompts = [tok.encode(text)[-keep:] for text in task_lib.few_shot_prompts(examples, shots)]
    replies = [cut_at_newline(tok, [i for i in r if i != eos])
               for r in generate(model, prompts, eos, max_new_tokens=max_new_tokens)]
    conf = np.exp(reply_logprobs(model, prompts, replies))
    ok = np.array([task_lib.verify(e, tok.decode(r).split("\n")[0].strip()) for e, r in zip(examples, replies)])
    return {"confidence": conf, "correct": ok, "tasks": [e.task for e in examples], "prompting": f"{shots}-shot"}


def applies(run: Path) -> bool:
    """Chat runs, and pre-trained decoders (3-shot); not encoders or encoder-decoders."""
    import json

    arch = json.loads((run / "config.json").read_text(encoding="utf-8")).get("arch", "decoder")
    return is_chat_run(run) or arch == "decoder"


def check(runs) -> None:
    """Refuse, before any work or output, runs this suite does not apply to."""
    if not runs:
        raise GlassmindError("--suite calibration needs RUN: one or more runs (a pre-trained decoder, sft, dpo, "
                             "ppo, grpo), in lifecycle order")
    bad = [str(r) for r in runs if not applies(r)]
    if bad:
        raise GlassmindError(f"--suite calibration applies to decoders (pre-trained, 3-shot; or chat runs); "
                             f"{', '.join(bad)} is an encoder or encoder-decoder. For those use --suite bias "
                             "(embeddings and pseudo-log-likelihood); --suite hallucination trains its own")


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
        numbers[f"prompting, {stage}"] = m["prompting"]
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
        what=(f"Greedy replies to {per_task} held-out prompts per built-in task (chat runs in their chat format, "
              f"pre-trained decoders 3-shot in plain text); confidence = probability of the whole reply, its "
              f"terminator included; ECE over {BINS} equal-width bins, 95% bootstrap interval (500 resamples)."),
        numbers=numbers, plots=plots, runs=[str(r) for r in ctx.runs], seconds=time.time() - t0, command=ctx.command)
