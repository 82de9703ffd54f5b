"""`glassmind grpo --policy SFT_RUN [--reward RM_RUN | --reward verifier]`: group relative policy optimisation.

GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1) drops PPO's value function: each prompt gets a group of G
sampled replies, and a reply's advantage is its reward standardised within the group (rl.group_advantages),
the same for all its tokens. The loss is PPO's clipped surrogate with those advantages, plus an optional
KL penalty in the loss itself (not in the reward), estimated per token with k3, DeepSeekMath eq. 4.

The reward is the reward model's score of each reply, or, with `--reward verifier`, 1 for a reply the
built-in task's verifier accepts and 0 otherwise (a verifiable reward, no learned model to exploit).

    rollouts (G per prompt, through the inference engine) -> rewards -> group advantages ->
    `epochs` passes of clipped updates (+ beta * k3 against the frozen SFT reference) -> log, checkpoint
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch

from glassmind.common import GlassmindError, config_field, print0
from glassmind.data import tasks as task_lib
from glassmind.train import losses as rl
from glassmind.train import metrics
from glassmind.train.chat_runs import accuracy_row, evaluate_tasks, load_chat_run, require_dir, save_outputs
from glassmind.train.optim import adamw
from glassmind.train.reward_model import load_reward_model
from glassmind.train.rollouts import (RLSettings, PolicyWithValue, frozen, minibatch_order, plot_rl, read_prompts,
                                      rl_summary, rollout, sample_seed, score_batch, step_prompts,
                                      verifier_accuracy)
from glassmind.train.run import Run, resolve_run_dtype, set_lr, setup_torch
from glassmind.train.schedule import lr_at

SETTINGS = "grpo.json"
VERIFIER = "verifier"


@dataclass
class GRPOConfig(RLSettings):
    out: str = config_field("runs/grpo", "run directory to write")
    steps: int = config_field(40, "GRPO steps")
    prompts_per_step: int = config_field(8, "prompts per step")
    group: int = config_field(8, "G: replies sampled per prompt")
    epochs: int = config_field(1, "passes over each batch (1: the ratio is 1 and the clip never binds)")
    kl_coef: float = config_field(0.04, "beta of the k3 KL term in the loss (0: no KL, no reference pass)")


def check(cfg: GRPOConfig) -> None:
    for name in ("steps", "prompts_per_step", "group", "max_new_tokens", "epochs", "minibatch"):
        if getattr(cfg, name) <= 0:
            raise GlassmindError(f"--{name.replace('_', '-')} must be positive")
    if cfg.group < 2:
        raise GlassmindError("--group must be >= 2: advantages are relative to the other replies of a prompt")
    if (cfg.prompts_per_step * cfg.group) % cfg.minibatch:
        raise GlassmindError("--prompts-per-step x --group must be a multiple of --minibatch")
    if not cfg.reward:
        raise GlassmindError("--reward is required: a reward-model run or 'verifier'")
    if cfg.reward == VERIFIER and cfg.prompts:
        raise GlassmindError("--reward verifier checks the built-in tasks' answers: drop --prompts")
    if cfg.temperature <= 0:
        raise GlassmindError("--temperature must be > 0: GRPO compares sampled replies")


def grpo_step(cfg: GRPOConfig, step: int, pm, ref, rm, fmt, optimizer, user_prompts, run: Run) -> dict:
    """Rollouts (G per prompt), rewards, group advantages and `epochs` passes of clipped updates, each
    minibatch stepped through `run.optimizer_step`. `pm` holds the PolicyWithValue (parallel.single_process)."""
    model: PolicyWithValue = pm.module
    n = cfg.prompts_per_step
    messages, examples = step_prompts(cfg, step, n, user_prompts)
    # each prompt repeated G times in a row; the engine seeds row i with seed + i, so the G replies differ
    messages = [m for m in messages for _ in range(cfg.group)]
    examples = [e for e in examples for _ in range(cfg.group)]
    model.eval()
    r = rollout(model.policy, fmt, messages, examples, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, seed=sample_seed(cfg.seed, step))
    B = len(messages)
    orders = [minibatch_order(cfg.seed, step, e, B, cfg.minibatch) for e in range(cfg.epochs)]
    with pm.autocast():  # --dtype: the same compute for old, reference and (below) new log-probs
        old_logp, _, ent, ref_logp = score_batch(model, ref, r, orders[0], temperature=cfg.temperature)
    with torch.no_grad(), pm.autocast():
        if rm is None:
            rewards = torch.tensor([float(task_lib.verify(e, rep)) for e, rep in zip(r.examples, r.replies)])
        else:
            rewards = rm(r.ids, r.attn)
    adv = rl.group_advantages(rewards.view(n, cfg.group)).view(B)                   # (B,)
    adv_tok = adv[:, None].expand_as(old_logp) * r.actions                            # (B, T-1)

    stats: dict[str, list[float]] = {"pg_loss": [], "clipfrac": [], "approx_kl": [], "kl": []}
    for order in orders:
        for idx in order:
            with pm.autocast():
                _, logp, _ = rl.forward_logprobs(model.policy, r.ids[idx], r.attn[idx], temperature=cfg.temperature)
            mask = r.actions[idx]
            pg_loss, pg_stats = rl.ppo_policy_loss(logp, old_logp[idx], adv_tok[idx], mask, cfg.clip)
            kl = rl.masked_mean(rl.kl_estimate(logp, ref_logp[idx], "k3"), mask)
            loss = pg_loss + cfg.kl_coef * kl if cfg.kl_coef > 0 else pg_loss
            loss.backward()
            run.optimizer_step(pm, optimizer, float(loss.detach()), step=step, grad_clip=cfg.grad_clip)
            stats["pg_loss"].append(float(pg_loss.detach()))
            stats["kl"].append(float(kl.detach()))
            stats["clipfrac"].append(pg_stats["clipfrac"])
            stats["approx_kl"].append(pg_stats["approx_kl"])
    # KL per reply under the rollout policy (k1 summed over the reply's tokens), comparable with PPO's
    seq_kl = (rl.kl_estimate(old_logp, ref_logp, "k1") * r.actions).sum(-1).mean()
    row = {"reward": float(rewards.mean()), "reward_std_in_group": float(rewards.view(n, cfg.group).std(-1).mean()),
           "kl": float(seq_kl), "entropy": float(rl.masked_mean(ent, r.actions)),
           "response_length": float(r.lengths.mean()),
           **{("kl_loss" if k == "kl" else k): sum(v) / len(v) for k, v in stats.items()}}
    acc = verifier_accuracy(r)
    if acc is not None:
        row["train_acc"] = acc
    row["sample"] = r.replies[0]
    return row


def grpo(cfg: GRPOConfig) -> dict:
    from glassmind.parallel import single_process

    t_start = time.perf_counter()
    check(cfg)
    require_dir(cfg.policy, "--policy")
    if cfg.reward != VERIFIER:
        require_dir(cfg.reward, "--reward")
    cfg, dtype_reason = resolve_run_dtype(cfg, SETTINGS, allowed=("fp32", "bf16"))  # auto -> what this CPU does fast
    setup_torch(cfg.threads)
    run = Run(cfg, SETTINGS)
    out = run.start(extra={"dtype_reason": dtype_reason})

    policy, tok, fmt = load_chat_run(cfg.policy, "--policy")
    rl.check_pad_eos(fmt.pad_id, fmt.end_id)
    # the reference pass also measures KL for the log, so it runs even with kl_coef 0
    ref = frozen(copy.deepcopy(policy))
    rm = None if cfg.reward == VERIFIER else frozen(load_reward_model(cfg.reward))
    model = PolicyWithValue(policy, None)
    user_prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    heldout = task_lib.heldout_examples(cfg.eval_per_task, cfg.tasks, cfg.world_seed)

    pm = single_process(model, mp=cfg.dtype)  # pm.autocast(): the scoring and update passes in cfg.dtype
    optimizer = adamw(model, lr=cfg.lr, weight_decay=0.0)
    log = run.log
    step, _ = run.resume(pm, optimizer)

    def save_checkpoint() -> None:
        run.checkpoint(pm, step, optimizer=optimizer)
        save_outputs(out, policy, tok)

    first = None
    if step == 0:
        first = {"step": 0, "split": "heldout", **accuracy_row(evaluate_tasks(policy, fmt, heldout))}
        log.log(first)
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, max_lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, decay="constant")
        set_lr(optimizer, lr)
        row = grpo_step(cfg, step, pm, ref, rm, fmt, optimizer, user_prompts, run)
        step += 1
        row = {"step": step, "tokens": step * cfg.prompts_per_step * cfg.group, "lr": lr, **row}
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            row.update(accuracy_row(evaluate_tasks(policy, fmt, heldout)))
        row["seconds"] = time.perf_counter() - t0
        log.log(row)
        if cfg.progress:
            acc = f"  held-out acc {row['heldout_acc']:.3f}" if "heldout_acc" in row else ""
            print0(f"grpo step {step}/{cfg.steps}  reward {row['reward']:+.3f}  kl {row['kl']:.3f}  "
                   f"entropy {row['entropy']:.3f}  len {row['response_length']:.1f}{acc}  {row['seconds']:.1f}s  "
                   f"{row['sample']!r}")
        if run.due(cfg.ckpt_every, step, cfg.steps):
            save_checkpoint()

    if run.needs_final_checkpoint(step):
        save_checkpoint()
    final = evaluate_tasks(policy, fmt, task_lib.heldout_examples(cfg.final_eval_per_task, cfg.tasks, cfg.world_seed))
    summary = {**rl_summary(out, step, log.rows(), first, final), "seconds": time.perf_counter() - t_start}
    plot_rl(log.rows(), out / "grpo.png", title=f"{out.name}: GRPO")
    metrics.write_card(
        out, title=f"{out.name}: GRPO",
        what=(f"GRPO from {cfg.policy}: {step} steps of {cfg.prompts_per_step} prompts x {cfg.group} replies, "
              f"reward from {'the verifier' if rm is None else 'the reward model ' + cfg.reward}, group-relative "
              f"advantages, no value model, KL coefficient {cfg.kl_coef} (k3 in the loss)."
              + f" Computed in {cfg.dtype} ({dtype_reason})."),
        parent=cfg.policy, numbers={k: v for k, v in summary.items() if k != "run" and v is not None},
        config={**dataclasses.asdict(cfg), "dtype_reason": dtype_reason}, plots=["grpo.png"])
    print0(f"grpo done: held-out accuracy {summary['heldout_acc']:.3f}, {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from glassmind.parallel.runtime import recipe_main

    return recipe_main(grpo, GRPOConfig, argv, prog="glassmind grpo", settings_file=SETTINGS,
                       description="GRPO: group-relative advantages, no value model, optional KL.")


if __name__ == "__main__":
    import sys

    sys.exit(main())
