"""The demo's alignment stage: SFT, a reward model, PPO and DPO on the built-in tasks, from a pre-trained base
run, and the table that says whether each step helped.

    alignment_stage(base, out_root)   sft -> reward data (built-in + the SFT model's own ranked samples) -> reward
                                      -> ppo, dpo; prints and returns the table
    ppo_study(sft_run, rm_run, out)   PPO with 3 seeds (is the change over SFT larger than the seeds' spread?)
                                      and with the KL coefficient at 0, at the demo's settings and pushed
                                      harder (what does the policy do unleashed?)

    python -m glassmind.studies.alignment --base runs/demo/pretrain-decoder --out runs/demo/align [--study]

Every accuracy here is exact match from the tasks' verifier on held-out prompts, never the reward model's
opinion. The base model has no chat format, so it is measured with 3-shot plain-text prompting
("Question: ...\\nAnswer: ..." three times, then the question), the fairest way to ask a base model.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from glassmind.common import GlassmindError, atomic_write_text, print0, run_main
from glassmind.data import tasks as task_lib

# The demo's settings per verb. "small": the demo's base model (a 2-layer, 128-wide decoder, vocabulary 4096);
# about 6 minutes of CPU for the whole alignment stage on one idle core. SFT learns from the SFT split of the
# prompts; the reward data, PPO and DPO use the RL split (tasks.split_of), so RL works on prompts SFT never saw.
# PPO and DPO train on the skill tasks (tasks.SKILL_TASKS): on add and world a prompt is a fact of its own and
# nothing learnt on one carries over to a held-out one. The table still reports every task. Learning rates,
# steps and batch sizes were chosen on the dev split of the time (the held-out prompts after the first 200 per
# task; the report now reads 500 per task, tasks.REPORT_PER_TASK, so some of those); the choice of the skill tasks
# for RL came from experiments whose accuracies were read on the reported held-out prompts too. "tiny": a smoke
# test.
BUDGETS = {
    "small": {
        "sft": dict(steps=1000, batch_size=32, lr=1e-3, n_examples=40000, eval_every=250, eval_per_task=10),
        "reward_data": dict(n_builtin=800, n_onpolicy=4000, k=8, temperature=1.3, max_new_tokens=10),
        "reward": dict(steps=800, batch_size=16, lr=3e-4, eval_every=200),
        "reward_eval": dict(k=8, temperature=1.0, max_new_tokens=10, per_task=200),
        "ppo": dict(steps=40, rollouts=64, minibatch=16, ppo_epochs=2, lr=3e-5, max_new_tokens=12, kl_coef=0.05,
                    value_warmup_steps=8, truncation_penalty=1.0, eval_every=1, eval_per_task=10,
                    final_eval_per_task=50, tasks=list(task_lib.SKILL_TASKS)),
        "dpo": dict(steps=120, batch_size=32, lr=5e-5, beta=0.1, n_prefs=800, eval_every=40, eval_per_task=10,
                    final_eval_per_task=50, tasks=list(task_lib.SKILL_TASKS)),
        "final_per_task": task_lib.REPORT_PER_TASK,
    },
    "tiny": {
        "sft": dict(steps=4, batch_size=4, n_examples=40, eval_every=0, eval_per_task=1),
        "reward_data": dict(n_builtin=8, n_onpolicy=8, k=2, temperature=1.0, max_new_tokens=4),
        "reward": dict(steps=4, batch_size=2, eval_every=0),
        "reward_eval": dict(k=2, n_builtin=6, per_task=2),
        "ppo": dict(steps=2, rollouts=4, minibatch=2, ppo_epochs=2, max_new_tokens=4, eval_per_task=1,
                    final_eval_per_task=1),
        "dpo": dict(steps=2, batch_size=4, n_prefs=4, eval_every=0, eval_per_task=1, final_eval_per_task=1),
        "final_per_task": 2,
    },
}
DEMO = BUDGETS["small"]


def _run(stage: str, cfg) -> dict:
    from glassmind.recipes import dpo, ppo, reward, sft

    fn = {"sft": sft.sft, "reward": reward.train_reward, "ppo": ppo.ppo, "dpo": dpo.dpo}[stage]
    return fn(cfg)


def _config(stage: str, budget: str, **kw: Any):
    from glassmind.recipes import dpo, ppo, reward, sft

    cls = {"sft": sft.SFTConfig, "reward": reward.RewardConfig, "ppo": ppo.PPOConfig, "dpo": dpo.DPOConfig}[stage]
    return cls(**{**BUDGETS[budget][stage], **kw})


def _stage(stage: str, out: Path, budget: str = "small", **kw: Any) -> dict:
    """Run one stage into `out`, resuming it if a previous demo was interrupted there."""
    done = (out / "card.md").exists()
    cfg = _config(stage, budget, out=str(out), resume=(out / f"{stage}.json").exists(), progress=True, **kw)
    if done:
        print0(f"{stage}: {out} is complete; measuring it again")
    t0, c0 = time.perf_counter(), time.process_time()
    summary = _run(stage, cfg) if not done else {}
    return {**summary, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


# ----------------------------------------------------------------------------------------------------
# measuring


def heldout(per_task: int = DEMO["final_per_task"]) -> list[task_lib.Example]:
    return task_lib.heldout_examples(per_task)


def chat_accuracy(run: str | Path, examples) -> dict:
    from glassmind.train.chat_runs import evaluate_tasks, load_chat_run

    model, _, fmt = load_chat_run(run)
    return evaluate_tasks(model, fmt, examples)


def base_accuracy(run: str | Path, examples, shots: int = 3) -> dict:
    """3-shot plain-text prompting of a base model: training examples of the same task as demonstrations,
    the reply is the generated text up to the first newline."""
    from glassmind import tokenizer as tok_lib
    from glassmind.model import load_model
    from glassmind.train.chat_runs import generate, score_replies

    model, tok = load_model(run), tok_lib.load(run)
    eos = tok.special_tokens.get("<|endoftext|>")
    prompts = [tok.encode(text)[-(model.config.context_length - 12):]
               for text in task_lib.few_shot_prompts(examples, shots)]
    replies = generate(model, prompts, eos if eos is not None else -1, max_new_tokens=12)
    texts = [tok.decode([i for i in r if i != eos]).split("\n")[0].strip() for r in replies]
    return score_replies(examples, texts)


def sample_replies(model, fmt, examples, k: int, *, temperature: float, max_new_tokens: int,
                   seed: int) -> tuple[list[list[str]], list[list[bool]]]:
    """`k` sampled replies per example (the policy as PPO's rollouts see it) and whether each closed with
    <|end|> (False: cut by the token limit)."""
    from glassmind.train.chat_runs import generate

    prompts = [fmt.render_prompt(e.messages()[:1]) for e in examples for _ in range(k)]
    raw = generate(model, prompts, fmt.end_id, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    texts, ended = [fmt.parse_reply(r) for r in raw], [fmt.end_id in r for r in raw]
    return [texts[i * k:(i + 1) * k] for i in range(len(examples))], [ended[i * k:(i + 1) * k]
                                                                       for i in range(len(examples))]


def onpolicy_preferences(sft_run: str | Path, examples, k: int, *, temperature: float, max_new_tokens: int,
                         seed: int) -> list[task_lib.Preference]:
    """Rankings of the SFT policy's own samples (`k` per prompt, ranked by tasks.SAMPLE_RANK_RULE); prompts
    whose samples all tie are dropped."""
    from glassmind.train.chat_runs import load_chat_run

    model, _, fmt = load_chat_run(sft_run)
    texts, ended = sample_replies(model, fmt, examples, k, temperature=temperature, max_new_tokens=max_new_tokens,
                                  seed=seed)
    prefs = [task_lib.sampled_preference(e, t, d) for e, t, d in zip(examples, texts, ended)]
    return [p for p in prefs if p is not None]


def write_reward_data(path: Path, sft_run: str | Path, *, n_builtin: int, n_onpolicy: int, k: int,
                      temperature: float, max_new_tokens: int, seed: int) -> dict:
    """The reward model's training file: `n_builtin` built-in rankings (hand-made near misses, wrong format,
    rambling) and the rankings of the SFT model's samples on `n_onpolicy` training prompts, shuffled together
    as one preference JSONL (what `glassmind reward --data` reads)."""
    builtin = task_lib.builtin_preferences("rl", n_builtin, seed)
    onpol = onpolicy_preferences(sft_run, task_lib.train_examples(n_onpolicy, seed + 7919, split="rl"), k,
                                 temperature=temperature, max_new_tokens=max_new_tokens, seed=seed * 1_000_003 + 17)
    prefs = builtin + onpol
    random.Random(f"glassmind-reward-data:{seed}").shuffle(prefs)
    task_lib.write_preferences_jsonl(path, prefs)
    return {"builtin": len(builtin), "onpolicy": len(onpol), "onpolicy_prompts": n_onpolicy}


def reward_numbers(rm_run: str | Path, sft_run: str | Path, examples, *, k: int = 8, temperature: float = 1.0,
                   max_new_tokens: int = 10, seed: int = 4242, n_builtin: int = 120) -> dict:
    """The reward model measured where it matters, on prompts it never trained on:

        builtin_pairwise_acc      the built-in held-out rankings (every strict pair)
        correct_vs_near_miss      of those, the correct reply against a same-format wrong one
        onpolicy_pairwise_acc     the SFT policy's own samples: correct (verifier) above incorrect, per prompt
        greedy / sample / pass@k / best_of_k
                                  the SFT policy's accuracy greedy, with one sample, with any of k samples,
                                  and with the sample the reward model likes best: if best-of-k is not above
                                  greedy, RL against this reward model has nothing to climb towards."""
    import torch

    from glassmind.train import losses as rl
    from glassmind.train import reward_model as reward_lib
    from glassmind.train.chat_runs import load_chat_run

    rm = reward_lib.load_reward_model(rm_run)
    model, _, fmt = load_chat_run(sft_run)
    builtin = reward_lib.pairwise_accuracy(rm, fmt, task_lib.builtin_preferences("heldout", n_builtin))
    texts, _ = sample_replies(model, fmt, examples, k, temperature=temperature, max_new_tokens=max_new_tokens,
                              seed=seed)
    greedy = chat_accuracy(sft_run, examples)["samples"]
    seqs = [(fmt.render_prompt(e.messages()[:1]) + fmt.render_reply(t))[-rm.config.context_length:]
            for e, ts in zip(examples, texts) for t in ts]
    with torch.no_grad():
        scores = torch.cat([rm(*rl.pad_rows(seqs[i:i + 256], fmt.pad_id)) for i in range(0, len(seqs), 256)])
    scores = scores.view(len(examples), k)
    right = pairs = 0.0
    tally = {"greedy": 0, "sample": 0, f"pass@{k}": 0, f"best_of_{k}": 0}
    for e, ts, s, g in zip(examples, texts, scores, greedy):
        ok = [task_lib.verify(e, t) for t in ts]
        for a in range(k):
            for b in range(k):
                if ok[a] and not ok[b]:
                    d = float(s[a] - s[b])
                    right, pairs = right + (1.0 if d > 0 else 0.5 if d == 0 else 0.0), pairs + 1
        tally["greedy"] += g["ok"]
        tally["sample"] += ok[0]
        tally[f"pass@{k}"] += any(ok)
        tally[f"best_of_{k}"] += ok[int(s.argmax())]
    return {"builtin_pairwise_acc": builtin["pairwise_acc"],
            "correct_vs_near_miss": builtin.get("acc_correct_vs_near_miss"),
            "onpolicy_pairwise_acc": right / pairs if pairs else None, "onpolicy_pairs": int(pairs),
            **{name: n / len(examples) for name, n in tally.items()}}


def _table(columns: dict[str, dict]) -> str:
    names = list(columns)
    w = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'task':<10}" + "".join(f"{n:>{w}}" for n in names)]
    for t in task_lib.TASKS + ("all",):
        cells = []
        for n in names:
            res = columns[n]
            v = res["accuracy"] if t == "all" else res["per_task"].get(t)
            cells.append(f"{'-' if v is None else f'{v:.3f}':>{w}}")
        lines.append(f"{t:<10}" + "".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# the stage


def alignment_stage(base_run: str | Path, out_root: str | Path, *, seed: int = 0, budget: str = "small",
                    threads: int | None = None, dtype: str = "auto",
                    command: str = "glassmind demo (its alignment stage)") -> dict:
    """SFT -> reward model -> PPO and DPO from `base_run` into `out_root/{sft,reward,ppo,dpo}`; prints the table
    of held-out exact-match accuracy per task (base 3-shot / SFT / PPO / DPO), the reward model's held-out
    pairwise accuracy, and PPO's mean reward and KL. Returns all of it. `budget`: "small" (the demo) or "tiny"
    (a smoke test). `dtype`: every stage's --dtype (auto: bf16 where the CPU computes it natively, else fp32)."""
    if budget not in BUDGETS:
        raise GlassmindError(f"budget {budget!r}: use one of {', '.join(BUDGETS)}")
    base_run, out_root = Path(base_run), Path(out_root)
    if not (base_run / "config.json").exists():
        raise GlassmindError(f"{base_run} is not a run directory: pre-train a base model first")
    out_root.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    runs = {s: out_root / s for s in ("sft", "reward", "ppo", "dpo")}
    stages: dict[str, dict] = {}
    if threads:
        from glassmind.train.run import setup_torch

        setup_torch(threads)  # the measurements in this process, as the stages do for theirs
    stages["sft"] = _stage("sft", runs["sft"], budget, parent=str(base_run), seed=seed, threads=threads, dtype=dtype)
    t1, c1 = time.perf_counter(), time.process_time()
    data = out_root / "reward-data.jsonl"
    if not data.exists():
        stages["reward_data"] = write_reward_data(data, runs["sft"], seed=seed, **BUDGETS[budget]["reward_data"])
    stages["reward_data"] = {**stages.get("reward_data", {}), "seconds": time.perf_counter() - t1,
                             "cpu_seconds": time.process_time() - c1}
    stages["reward"] = _stage("reward", runs["reward"], budget, parent=str(runs["sft"]), data=str(data), seed=seed,
                              threads=threads, dtype=dtype)
    stages["ppo"] = _stage("ppo", runs["ppo"], budget, policy=str(runs["sft"]), reward=str(runs["reward"]),
                           seed=seed, threads=threads, dtype=dtype)
    stages["dpo"] = _stage("dpo", runs["dpo"], budget, policy=str(runs["sft"]), seed=seed, threads=threads, dtype=dtype)

    examples = heldout(BUDGETS[budget]["final_per_task"])
    columns = {"base (3-shot)": base_accuracy(base_run, examples), "SFT": chat_accuracy(runs["sft"], examples),
               "PPO": chat_accuracy(runs["ppo"], examples), "DPO": chat_accuracy(runs["dpo"], examples)}
    ppo_rows = [json.loads(line) for line in (runs["ppo"] / "metrics.jsonl").read_text().splitlines()]
    ppo_rows = [r for r in ppo_rows if "reward" in r]
    # the reward model on the first 200 held-out prompts per task: 8 samples each, scored, is the slow part
    rm_eval = dict(BUDGETS[budget]["reward_eval"])
    rm = reward_numbers(runs["reward"], runs["sft"], heldout(rm_eval.pop("per_task")), **rm_eval)
    result = {
        "accuracy": {name: {"all": c["accuracy"], **c["per_task"]} for name, c in columns.items()},
        "heldout_prompts": len(examples),
        "reward_model_pairwise_acc": rm["builtin_pairwise_acc"],
        "reward_model_correct_vs_near_miss": rm["correct_vs_near_miss"],
        "reward_model": rm,
        "ppo_reward": [r["reward"] for r in ppo_rows], "ppo_kl": [r["kl"] for r in ppo_rows],
        "samples": {name: c["samples"][:6] for name, c in columns.items()},
        "stage_seconds": {s: round(v["seconds"], 1) for s, v in stages.items()},
        "stage_cpu_seconds": {s: round(v["cpu_seconds"], 1) for s, v in stages.items()},
        "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
        "dtype": {s: json.loads((runs[s] / f"{s}.json").read_text(encoding="utf-8"))["dtype"] for s in runs},
    }
    text = report(result, columns)
    print0(text)
    atomic_write_text(out_root / "alignment.md", text + "\n")
    atomic_write_text(out_root / "alignment.json", json.dumps(result, indent=2) + "\n")
    rows = [{"stage": name, "task": task, "accuracy": acc} for name, accs in result["accuracy"].items()
            for task, acc in accs.items()]
    study_files(out_root, "alignment", rows, text, command=command, columns=["stage", "task", "accuracy"],
                plot=[(name, accs["all"]) for name, accs in result["accuracy"].items()],
                ylabel=f"held-out accuracy ({result['heldout_prompts']} prompts, verifier)")
    return result


def _rm_line(rm: dict) -> str:
    k = next(n.split("@")[1] for n in rm if n.startswith("pass@"))
    onpol = rm["onpolicy_pairwise_acc"]
    return (f"  on the SFT model's own samples (held-out prompts): correct above incorrect "
            f"{'-' if onpol is None else f'{onpol:.3f}'} over {rm['onpolicy_pairs']} pairs; SFT greedy "
            f"{rm['greedy']:.3f}, one sample {rm['sample']:.3f}, pass@{k} {rm[f'pass@{k}']:.3f}, "
            f"best of {k} by the reward model {rm[f'best_of_{k}']:.3f}")


def report(result: dict, columns: dict[str, dict]) -> str:
    r, k = result["ppo_reward"], result["ppo_kl"]
    quarter = max(1, len(r) // 4)
    lines = [f"Held-out exact-match accuracy ({result['heldout_prompts']} prompts never seen in training; verifier):",
             "", _table(columns), "",
             f"Reward model, held-out pairwise accuracy: {result['reward_model_pairwise_acc']:.3f} on the built-in "
             "rankings" + (f" (correct vs near miss: {result['reward_model_correct_vs_near_miss']:.3f})"
                           if result.get("reward_model_correct_vs_near_miss") is not None else ""),
             _rm_line(result["reward_model"]),
             f"PPO mean RM reward: step 1 {r[0]:+.3f} -> last {quarter} steps {statistics.fmean(r[-quarter:]):+.3f}; "
             f"KL per reply over the last {quarter} steps {statistics.fmean(k[-quarter:]):.3f} (max {max(k):.3f})",
             "Compute dtype: " + ", ".join(f"{s} {d}" for s, d in result.get("dtype", {}).items()),
             "Stage seconds: " + ", ".join(f"{s} {v}" for s, v in result["stage_seconds"].items())
             + f"; total {result['seconds']} s (CPU time of this process: total {result['cpu_seconds']} s; "
             + ", ".join(f"{s} {v}" for s, v in result["stage_cpu_seconds"].items()) + ")"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# the study: seeds and KL = 0


PUSH = dict(lr=1e-4, ppo_epochs=4, steps=40)  # PPO pushed harder: where the KL term has something to hold back
LONG_STEPS = 150  # PPO run longer than the demo's 40 steps: the verifier's ceiling, and the reward model's fate


def _ppo_numbers(run: Path, examples, seconds: float) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]
    acc = chat_accuracy(run, examples)
    q = max(1, len(rows) // 4)
    last = rows[-q:]
    return {"accuracy": acc["accuracy"], "per_task": acc["per_task"], "reward_first": rows[0]["reward"],
            "reward_last": statistics.fmean(r["reward"] for r in last),
            "kl_last": statistics.fmean(r["kl"] for r in last), "kl_max": max(r["kl"] for r in rows),
            "train_acc_last": statistics.fmean(r.get("train_acc", 0.0) for r in last),
            "length_last": statistics.fmean(r["response_length"] for r in last),
            "samples": acc["samples"][:8], "seconds": seconds}


def _seed_claim(accs: list[float], sft: float) -> dict:
    """The issue's claim for a set of seeds: every seed above SFT, and the mean gain larger than the spread."""
    gains = [a - sft for a in accs]
    spread = max(accs) - min(accs)
    return {"gains": gains, "gain_mean": statistics.fmean(gains), "seed_spread": spread,
            "claim_met": min(gains) > 0 and statistics.fmean(gains) > spread}


def ppo_study(sft_run: str | Path, rm_run: str | Path, out_root: str | Path, *, seeds=(0, 1, 2),
              kl0: bool = True, push: dict | None = PUSH, verifier: bool = True, long_steps: int | None = LONG_STEPS,
              per_task: int = DEMO["final_per_task"], budget: str = "small",
              command: str = "glassmind.studies.alignment.ppo_study (from Python)", **overrides: Any) -> dict:
    """PPO from one SFT run and one reward model:

        seed<s>            the demo's settings with seeds 0, 1, 2: is PPO's change in held-out accuracy larger
                           than the spread across seeds?
        verifier-seed<s>   the same with the tasks' verifier as the reward (1 right, 0 wrong): what PPO does
                           when the reward is never wrong, so whether the reward model is what limits it
        kl0                the demo's settings with kl_coef 0
        push-kl<b>         lr, epochs and steps from `push` (PPO pushed harder), with the demo's KL coefficient
                           and with 0: what the KL penalty holds back when the policy can move far
        verifier-long-seed<s>, long
                           `long_steps` steps (the demo's other settings) with the verifier, seeds 0, 1, 2 (how far
                           a reward that is never wrong takes this policy: the ceiling of any reward model), and
                           with the reward model, seed 0 (what the same length does with a learned reward)

    Prints per run the held-out accuracy (verifier), RM reward first -> last quarter, KL, rollout accuracy,
    reply length, and sample replies of the KL = 0 runs; writes ppo_study.md/json under `out_root`."""
    out_root = Path(out_root)
    examples = heldout(per_task)
    sft_acc = chat_accuracy(sft_run, examples)
    runs: dict[str, dict] = {f"seed{s}": dict(seed=s) for s in seeds}
    if kl0:
        runs["kl0"] = dict(seed=seeds[0], kl_coef=0.0)
    if push:
        runs[f"push-kl{DEMO['ppo']['kl_coef']}"] = dict(seed=seeds[0], **push)
        runs["push-kl0"] = dict(seed=seeds[0], kl_coef=0.0, **push)
    if verifier:
        runs.update({f"verifier-seed{s}": dict(seed=s, reward="verifier") for s in seeds})
    if long_steps:
        runs.update({f"verifier-long-seed{s}": dict(seed=s, reward="verifier", steps=long_steps, eval_every=10)
                     for s in seeds})
        runs["long"] = dict(seed=seeds[0], steps=long_steps, eval_every=10)
    results = {}
    for name, kw in runs.items():
        run = out_root / f"ppo-{name}"
        st = _stage("ppo", run, budget, policy=str(sft_run), **{"reward": str(rm_run), **overrides, **kw})
        results[name] = _ppo_numbers(run, examples, st["seconds"])
    summary = {"sft_accuracy": sft_acc["accuracy"], "sft_per_task": sft_acc["per_task"], "runs": results,
               **_seed_claim([results[f"seed{s}"]["accuracy"] for s in seeds], sft_acc["accuracy"])}
    if verifier:
        summary["verifier"] = _seed_claim([results[f"verifier-seed{s}"]["accuracy"] for s in seeds],
                                          sft_acc["accuracy"])
    if long_steps:
        summary["verifier_long"] = _seed_claim([results[f"verifier-long-seed{s}"]["accuracy"] for s in seeds],
                                               sft_acc["accuracy"])
    lines = [f"SFT held-out accuracy: {sft_acc['accuracy']:.3f} ({len(examples)} prompts)", "",
             _table({"SFT": sft_acc, **results}), ""]
    for name, r in results.items():
        lines.append(f"{name:>15}: PPO accuracy {r['accuracy']:.3f} ({r['accuracy'] - sft_acc['accuracy']:+.3f}), "
                     f"reward {r['reward_first']:+.3f} -> {r['reward_last']:+.3f}, KL {r['kl_last']:.3f} "
                     f"(max {r['kl_max']:.3f}), rollout accuracy {r['train_acc_last']:.3f}, "
                     f"reply length {r['length_last']:.1f}")
    for label, claim in (("reward model", summary), ("verifier", summary.get("verifier")),
                         (f"verifier for {long_steps} steps", summary.get("verifier_long"))):
        if claim is not None:
            lines.append(f"PPO with the {label}: change over {len(seeds)} seeds {claim['gain_mean']:+.3f} (each: "
                         + ", ".join(f"{g:+.3f}" for g in claim["gains"]) + "); spread of PPO accuracy across "
                         f"seeds {claim['seed_spread']:.3f}: PPO "
                         + ("beats" if claim["claim_met"] else "does NOT beat") + " SFT by more than the spread")
    for name in [n for n in results if n.endswith("kl0")]:
        lines.append(f"{name} replies: " + "; ".join(f"{s['prompt']!r} -> {s['reply']!r}"
                                                      for s in results[name]["samples"][:6]))
    text = "\n".join(lines)
    print0(text)
    atomic_write_text(out_root / "ppo_study.md", text + "\n")
    atomic_write_text(out_root / "ppo_study.json", json.dumps(summary, indent=2) + "\n")
    rows = [{"run": name, "accuracy": r["accuracy"], "change": r["accuracy"] - sft_acc["accuracy"],
             "reward_first": r["reward_first"], "reward_last_quarter": r["reward_last"], "kl_last_quarter": r["kl_last"],
             **{f"acc_{t}": a for t, a in r["per_task"].items()}} for name, r in results.items()]
    study_files(out_root, "ppo_study", rows, text, command=command,
                plot=[("SFT", sft_acc["accuracy"])] + [(name, r["accuracy"]) for name, r in results.items()],
                ylabel=f"held-out accuracy ({len(examples)} prompts, verifier)")
    return summary


def study_files(out_root: Path, name: str, rows: list[dict], text: str, *, command: str,
                columns: list[str] | None = None, plot: list[tuple[str, float]], ylabel: str) -> None:
    """The studies' conventions (glassmind/studies/sweep.py): a CSV of every point, a PNG, and card.md with the
    numbers and the command that made them."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glassmind.common import atomic_write_bytes
    from glassmind.studies.sweep import write_csv

    write_csv(out_root / f"{name}.csv", rows, columns)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(plot) + 2), 3.6), dpi=100)
    ax.bar(range(len(plot)), [v for _, v in plot], color="#4c72b0")
    ax.set_xticks(range(len(plot)), [k for k, _ in plot], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_ylim(min(v for _, v in plot) * 0.9, 1.0)
    ax.grid(axis="y", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out_root / f"{name}.png", buf.getvalue())
    card = [f"# {name}", "", "Made by:", "", "    " + command, "", f"![{name}.png]({name}.png)", "", "```", text,
            "```", ""]
    atomic_write_text(out_root / "card.md", "\n".join(card))


def main(argv: list[str] | None = None) -> int:
    import sys

    from glassmind.studies.sweep import command_line

    def body(argv):
        p = argparse.ArgumentParser(prog="glassmind study alignment", description=__doc__.split("\n")[0])
        p.add_argument("--base", required=True, help="a pre-trained decoder run (e.g. runs/demo/pretrain-decoder)")
        p.add_argument("--out", default="runs/demo/align", help="where the stages write their runs")
        p.add_argument("--study", action="store_true", help="also run PPO with 3 seeds and with KL coefficient 0")
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all)")
        p.add_argument("--study-reward", default=None, metavar="RM_RUN",
                       help="run only the study's 3 reward-model seeds, against this reward model (e.g. one from a "
                            "larger SFT model), into OUT/study-<its name>")
        p.add_argument("--budget", choices=tuple(BUDGETS), default="small",
                       help="small (the demo's settings) or tiny (a smoke test)")
        p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                       help="every stage's compute dtype (default auto: bf16 where this CPU computes it natively, "
                            "else fp32)")
        args = p.parse_args(argv)
        out = Path(args.out)
        per_task = BUDGETS[args.budget]["final_per_task"]
        command = command_line("alignment", list(argv if argv is not None else sys.argv[1:]))
        if args.study_reward:
            rm = Path(args.study_reward)
            ppo_study(out / "sft", rm, out / f"study-{rm.name}", kl0=False, push=None, verifier=False,
                      long_steps=None, per_task=per_task, budget=args.budget, threads=args.threads, command=command,
                      dtype=args.dtype)
            return 0
        alignment_stage(args.base, args.out, budget=args.budget, threads=args.threads, dtype=args.dtype,
                        command=command)
        if args.study:
            ppo_study(out / "sft", out / "reward", out / "study", per_task=per_task, budget=args.budget,
                      threads=args.threads, command=command, dtype=args.dtype)
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
