"""`glassmind ppo --policy SFT_RUN --reward RM_RUN`: RLHF with PPO and a per-token KL penalty.

    1. config        one dataclass; flags come from its fields
    2. rollouts      prompts -> replies sampled through the inference engine (seeded per step) -> a batch
    3. scoring       old log-probs, values, reference log-probs, reward-model scores, all without gradient
    4. rewards       r_t = -beta * KL_t on every reply token, + the normalised RM score on the last one
                     (minus truncation_penalty when the reply was cut before <|end|>)
    5. advantages    GAE over the reply tokens, whitened
    6. the update    several epochs of minibatches: clipped policy loss + vf_coef * clipped value loss
    7. the loop      log every step (reward, KL, entropy, clip fraction, value loss, approx-KL, length,
                     held-out accuracy from the verifier), adapt beta, checkpoint, exact resume

The recipe is Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and InstructGPT
(Ouyang et al. 2022): the frozen SFT model is the reference, the reward model scores whole replies.

The value function is a head on the policy's own trunk (a ScalarHead on the same hidden states the LM head
reads), not a separate value model. Why: on a CPU every extra transformer forward and backward costs about as
much as the policy's, and with a shared trunk one forward pass gives both log-probs and values. The price is
that value-loss gradients also move the policy's features; vf_coef (0.1) and the value clip keep that small.
InstructGPT used a separate value model initialised from the reward model, which is the better choice when
compute allows (the value starts out knowing what the reward model likes). The head starts at zero, so the
first advantages are the returns themselves: with value_warmup_steps > 0 the first steps fit the head alone
(policy frozen), because most of the variance of an RM score is the prompt's, not the reply's (measured on the
demo: 4/5 of it), and an advantage without that baseline mostly says which prompt was drawn.

Rollouts sampled at temperature T come from softmax(logits / T), so every log-prob (old, new, reference) is
computed at that same T: the ratio and the KL are those of the policy that acted.

Exactness at the first step: the reference is a copy of the initial policy and every log-prob of a batch comes
from the same function on the same minibatch (scoring uses epoch 0's minibatch order), so at step 0 the KL is
exactly 0 and in every step the first minibatch's ratio is exactly 1.
Compute dtype (--dtype, auto: bf16 where the CPU computes it natively): scoring, the reward model and the
updates run under that autocast, so the exactness above holds in bf16 too; the rollouts are sampled by the
inference engine in fp32, a small gap between the policy that acted and the one scored (the same gap a trainer
has with a separate inference server), which the old log-probs absorb: the ratio is taken against them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from glassmind.common import GlassmindError, atomic_path, config_field, print0
from glassmind.data import tasks as task_lib
from glassmind.tokenizer.chat import ChatFormat
from glassmind.train import losses as rl
from glassmind.train import metrics
from glassmind.train.chat_runs import accuracy_row, evaluate_tasks, load_chat_run, require_dir, save_outputs
from glassmind.train.optim import adamw
from glassmind.train.reward_model import load_reward_model
from glassmind.train.rollouts import (RLSettings, PolicyWithValue, frozen, minibatch_order, plot_rl, policy_forward,
                                      read_prompts, rl_summary, rollout, sample_seed, score_batch,
                                      step_prompts, verifier_accuracy, zero_value_head)
from glassmind.train.run import Run, resolve_run_dtype, set_lr, setup_torch
from glassmind.train.schedule import lr_at

SETTINGS = "ppo.json"
VERIFIER = "verifier"
VALUE_HEAD_FILE = "value_head.safetensors"

# ======================================================================================================
# 1. Configuration
# ======================================================================================================


@dataclass
class PPOConfig(RLSettings):
    reward: str = config_field("", "the reward-model run (glassmind reward), or 'verifier': 1/0 from the built-in "
                                   "tasks' verifier instead of a learned model (a diagnostic: is the reward model "
                                   "what limits PPO?)")
    out: str = config_field("runs/ppo", "run directory to write")
    steps: int = config_field(40, "PPO steps (each: rollouts, scoring, several epochs of updates)")
    rollouts: int = config_field(64, "prompts per step, one sampled reply each")
    ppo_epochs: int = config_field(4, "passes over each batch of rollouts")
    kl_coef: float = config_field(0.05, "beta: weight of the per-token KL penalty (0: no penalty)")
    kl_estimator: str = config_field("k1", "per-token KL estimator: k1 = log(pi/ref), k3 = (r-1) - log r",
                           choices=("k1", "k3"))
    kl_target: Optional[float] = config_field(None, "adapt beta towards this KL per reply (Ziegler et al.); "
                                                    "None: fixed beta")
    kl_horizon: int = config_field(10000, "adaptive KL: the horizon in replies")
    gamma: float = config_field(1.0, "discount")
    lam: float = config_field(0.95, "GAE lambda")
    vf_clip: float = config_field(0.2, "value clip")
    vf_coef: float = config_field(0.1, "weight of the value loss")
    value_warmup_steps: int = config_field(0, "first N steps train the value head alone (policy frozen, no "
                                              "value clip), so advantages start from a baseline, not from 0")
    value_warmup_lr: float = config_field(3e-3, "learning rate of the value head during the value warmup")
    reward_norm: bool = config_field(True, "normalise RM scores by their running mean and std")
    samples_per_prompt: int = config_field(1, "replies sampled per prompt (rollouts / this = prompts per step)")
    prompt_baseline: bool = config_field(False, "subtract from each RM score the mean score of its prompt's "
                                                "replies (needs --samples-per-prompt > 1)")
    truncation_penalty: float = config_field(0.0, "subtracted from the (normalised) score of a reply cut by "
                                                  "--max-new-tokens before it wrote <|end|>")
    whiten_advantages: bool = config_field(True, "normalise advantages to mean 0, std 1 per batch")


def check(cfg: PPOConfig) -> None:
    for name in ("steps", "rollouts", "max_new_tokens", "ppo_epochs", "minibatch"):
        if getattr(cfg, name) <= 0:
            raise GlassmindError(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= cfg.value_warmup_steps < cfg.steps:
        raise GlassmindError(f"--value-warmup-steps must be in [0, --steps {cfg.steps})")
    if cfg.samples_per_prompt <= 0 or cfg.rollouts % cfg.samples_per_prompt:
        raise GlassmindError(f"--rollouts {cfg.rollouts} must be a multiple of --samples-per-prompt")
    if cfg.prompt_baseline and cfg.samples_per_prompt < 2:
        raise GlassmindError("--prompt-baseline needs --samples-per-prompt of at least 2")
    if cfg.rollouts % cfg.minibatch:
        raise GlassmindError(f"--rollouts {cfg.rollouts} must be a multiple of --minibatch {cfg.minibatch}")
    if cfg.kl_coef < 0:
        raise GlassmindError("--kl-coef must be >= 0")
    if cfg.temperature <= 0:
        raise GlassmindError("--temperature must be > 0: PPO needs sampled rollouts")


def save_policy(out: Path, model: PolicyWithValue, tok) -> None:
    """The policy as a plain model run (loadable by glassmind.model.load_model), the value head beside it."""
    from safetensors.torch import save_file

    save_outputs(out, model.policy, tok)
    if model.value_head is not None:
        with atomic_path(out / VALUE_HEAD_FILE) as tmp:
            save_file({k: v.detach().contiguous() for k, v in model.value_head.state_dict().items()}, str(tmp))


# ======================================================================================================
# 3.-6. One PPO step
# ======================================================================================================


def ppo_step(cfg: PPOConfig, step: int, pm, ref: nn.Module, rm: nn.Module, fmt: ChatFormat, optimizer,
             kl_ctl: rl.KLController, moments: rl.RunningMoments, user_prompts, run: Run) -> dict:
    """Rollouts, scoring, rewards, GAE and `ppo_epochs` epochs of clipped updates, each minibatch stepped
    through `run.optimizer_step`. `pm` holds the PolicyWithValue (parallel.single_process). Returns the step's
    stats."""
    model: PolicyWithValue = pm.module
    k = cfg.samples_per_prompt
    messages, examples = step_prompts(cfg, step, cfg.rollouts // k, user_prompts)
    messages, examples = [m for m in messages for _ in range(k)], [e for e in examples for _ in range(k)]
    model.eval()  # no dropout anywhere in RL: the ratio must compare the same function
    r = rollout(model.policy, fmt, messages, examples, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, seed=sample_seed(cfg.seed, step))
    act = r.actions.float()
    orders = [minibatch_order(cfg.seed, step, e, cfg.rollouts, cfg.minibatch) for e in range(cfg.ppo_epochs)]

    # -- 3. scoring ---------------------------------------------------------------------------------------
    with pm.autocast():  # --dtype: the same compute for old, reference and (below) new log-probs
        old_logp, values, ent, ref_logp = score_batch(model, ref, r, orders[0], temperature=cfg.temperature)
    with torch.no_grad(), pm.autocast():
        if rm is None:  # --reward verifier: the task's verdict, 1 or 0
            scores = torch.tensor([float(task_lib.verify(e, rep)) for e, rep in zip(r.examples, r.replies)])
        else:
            scores = rm(r.ids, r.attn)                                                # (B,)

    # -- 4. rewards: KL penalty on every reply token, the (normalised) score on the last -----------------
    kl = rl.kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * act                  # (B, T-1)
    if cfg.prompt_baseline:
        # most of an RM score's variance is the prompt's (4/5 on the demo); the mean over the same prompt's
        # other replies removes it before the value head has to (as RLOO / GRPO do, here with the critic kept)
        centred = rl.leave_one_out(scores, k)
    else:
        centred = scores
    if cfg.reward_norm:
        moments.update(centred)
        final = moments.normalise(centred)
    else:
        final = centred
    if cfg.truncation_penalty:
        # the reward model only ever saw replies closed by <|end|>; one cut short is scored off its training
        # distribution, so it is marked down instead of trusted
        final = final - cfg.truncation_penalty * (~r.ended).float()
    beta = kl_ctl.value
    rewards = -beta * kl + rl.place_at_last(final, r.actions)

    # -- 5. advantages ------------------------------------------------------------------------------------
    advantages, returns = rl.gae(rewards, values, r.actions, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = rl.masked_whiten(advantages, r.actions)

    # -- 6. the update ------------------------------------------------------------------------------------
    stats: dict[str, list[float]] = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": [],
                                     "vf_clipfrac": []}
    ratio_first = None
    # Value warmup (the value head starts at 0, so until it has learnt which prompts score high, an advantage
    # is mostly "this prompt is easy", not "this reply was good"): fit the head alone on frozen features.
    warmup = step < cfg.value_warmup_steps
    for order in orders:
        for idx in order:
            with pm.autocast():
                logp, v, _ = policy_forward(model, r.ids[idx], r.attn[idx], temperature=cfg.temperature,
                                            value_only=warmup)
            mask = r.actions[idx]
            pg_loss, pg_stats = rl.ppo_policy_loss(logp, old_logp[idx], advantages[idx], mask, cfg.clip)
            vf_loss, vf_stats = rl.ppo_value_loss(v, values[idx], returns[idx], mask,
                                                  math.inf if warmup else cfg.vf_clip)
            if ratio_first is None:
                ratio_first = pg_stats["ratio"]
            loss = vf_loss if warmup else pg_loss + cfg.vf_coef * vf_loss
            loss.backward()
            run.optimizer_step(pm, optimizer, float(loss.detach()), step=step, grad_clip=cfg.grad_clip)
            losses = {"pg_loss": float(pg_loss.detach()), "vf_loss": float(vf_loss.detach())}
            for k, val in (*losses.items(), *pg_stats.items(), *vf_stats.items()):
                if k in stats:
                    stats[k].append(val)

    seq_kl = (kl.sum(-1)).mean()
    kl_ctl.update(float(seq_kl), cfg.rollouts)
    row = {"reward": float(scores.mean()), "reward_normalised": float(final.mean()),
           "kl": float(seq_kl), "kl_coef": beta, "entropy": float(rl.masked_mean(ent, r.actions)),
           "response_length": float(r.lengths.mean()), "truncated": float((~r.ended).float().mean()),
           "ratio_first": ratio_first,
           **{k: sum(v) / len(v) for k, v in stats.items()}}
    acc = verifier_accuracy(r)
    if acc is not None:
        row["train_acc"] = acc
    row["sample"] = r.replies[0]
    return row


# ======================================================================================================
# 7. The loop
# ======================================================================================================


def ppo(cfg: PPOConfig) -> dict:
    from glassmind.parallel import single_process

    t_start = time.perf_counter()
    check(cfg)
    require_dir(cfg.policy, "--policy")
    if cfg.reward != VERIFIER:
        require_dir(cfg.reward, "--reward")
    elif cfg.prompts:
        raise GlassmindError("--reward verifier checks the built-in tasks' answers: drop --prompts")
    cfg, dtype_reason = resolve_run_dtype(cfg, SETTINGS, allowed=("fp32", "bf16"))  # auto -> what this CPU does fast
    setup_torch(cfg.threads)
    run = Run(cfg, SETTINGS)
    out = run.start(extra={"dtype_reason": dtype_reason})

    policy, tok, fmt = load_chat_run(cfg.policy, "--policy")
    rl.check_pad_eos(fmt.pad_id, fmt.end_id)
    ref = frozen(copy.deepcopy(policy))
    rm = frozen(load_reward_model(cfg.reward)) if cfg.reward != VERIFIER else None
    if rm is not None and rm.config.vocab_size < tok.vocab_size:
        raise GlassmindError(f"the reward model {cfg.reward} has a smaller vocabulary ({rm.config.vocab_size}) than "
                             f"the policy's tokenizer ({tok.vocab_size}): train it from the same SFT run")
    model = PolicyWithValue(policy, zero_value_head(policy.config.d_model))
    user_prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    heldout = task_lib.heldout_examples(cfg.eval_per_task, cfg.tasks, cfg.world_seed)

    pm = single_process(model, mp=cfg.dtype)  # pm.autocast(): the scoring and update passes in cfg.dtype
    optimizer = adamw(model, lr=cfg.lr, weight_decay=0.0)
    kl_ctl = rl.KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    moments = rl.RunningMoments()
    log = run.log
    step, info = run.resume(pm, optimizer)
    if info["extra"]:
        kl_ctl.load_state_dict(info["extra"]["kl_ctl"])
        moments.load_state_dict(info["extra"]["moments"])

    def save_checkpoint() -> None:
        run.checkpoint(pm, step, optimizer=optimizer,
                       extra={"kl_ctl": kl_ctl.state_dict(), "moments": moments.state_dict()})
        save_policy(out, model, tok)

    first = None
    if step == 0:
        first = {"step": 0, "split": "heldout", **accuracy_row(evaluate_tasks(model.policy, fmt, heldout))}
        log.log(first)
    while step < cfg.steps:
        t0 = time.perf_counter()
        if step < cfg.value_warmup_steps:  # only the head has gradients then, so only it moves
            lr = cfg.value_warmup_lr
        else:
            lr = lr_at(step - cfg.value_warmup_steps, max_lr=cfg.lr, total_steps=cfg.steps - cfg.value_warmup_steps,
                       warmup_steps=cfg.warmup_steps, decay="constant")
        set_lr(optimizer, lr)
        row = ppo_step(cfg, step, pm, ref, rm, fmt, optimizer, kl_ctl, moments, user_prompts, run)
        step += 1
        row = {"step": step, "tokens": step * cfg.rollouts, "lr": lr, **row}
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            row.update(accuracy_row(evaluate_tasks(model.policy, fmt, heldout)))
        row["seconds"] = time.perf_counter() - t0
        log.log(row)
        if cfg.progress:
            acc = f"  held-out acc {row['heldout_acc']:.3f}" if "heldout_acc" in row else ""
            print0(f"ppo step {step}/{cfg.steps}  reward {row['reward']:+.3f}  kl {row['kl']:.3f}  "
                   f"entropy {row['entropy']:.3f}  clipfrac {row['clipfrac']:.3f}  vf_loss {row['vf_loss']:.3f}  "
                   f"len {row['response_length']:.1f}{acc}  {row['seconds']:.1f}s  {row['sample']!r}")
        if run.due(cfg.ckpt_every, step, cfg.steps):
            save_checkpoint()

    if run.needs_final_checkpoint(step):
        save_checkpoint()
    final = evaluate_tasks(model.policy, fmt,
                           task_lib.heldout_examples(cfg.final_eval_per_task, cfg.tasks, cfg.world_seed))
    summary = {**rl_summary(out, step, log.rows(), first, final), "kl_coef": kl_ctl.value,
               "seconds": time.perf_counter() - t_start}
    plot_rl(log.rows(), out / "ppo.png", title=f"{out.name}: PPO")
    metrics.write_card(
        out, title=f"{out.name}: PPO (RLHF)",
        what=(f"PPO from {cfg.policy} against "
              f"{'the tasks verifier (1/0)' if cfg.reward == VERIFIER else 'the reward model ' + cfg.reward}: {step} steps of {cfg.rollouts} "
              f"rollouts, {cfg.ppo_epochs} epochs of minibatches of {cfg.minibatch}, per-token KL penalty "
              f"({cfg.kl_estimator}, beta {cfg.kl_coef}{', adaptive to ' + str(cfg.kl_target) if cfg.kl_target else ''}"
              "), GAE, clipped policy and value losses; value head on the policy trunk. Held-out accuracy from the "
              "verifier over " + str(len(final["samples"])) + " prompts."
              + f" Computed in {cfg.dtype} ({dtype_reason})."),
        parent=cfg.policy, numbers={k: v for k, v in summary.items() if k != "run" and v is not None},
        config={**dataclasses.asdict(cfg), "dtype_reason": dtype_reason}, plots=["ppo.png"])
    print0(f"ppo done: held-out accuracy {summary['heldout_acc']:.3f}, reward {summary['reward_first']:+.3f} -> "
           f"{summary['reward_last_quarter']:+.3f}, KL {summary['kl_last_quarter']:.3f}, {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from glassmind.parallel.runtime import recipe_main

    return recipe_main(ppo, PPOConfig, argv, prog="glassmind ppo", settings_file=SETTINGS,
                       description="RLHF with PPO: rollouts, a reward model, a KL penalty against the SFT model.")


if __name__ == "__main__":
    import sys

    sys.exit(main())
