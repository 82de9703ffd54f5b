"""`glassmind dpo --policy SFT_RUN`: direct preference optimisation on the same rankings the reward model reads.

DPO (Rafailov et al. 2023) skips the reward model and the rollouts: the policy's own log-probability ratio
against the frozen SFT reference is the implicit reward, r(y) = beta * log(pi(y|x) / pi_ref(y|x)), and the
Bradley-Terry loss on it is minimised directly over preference pairs (rl.dpo_loss). A K-way ranking gives
every strict pair it implies; ties give no pair (DPO has no notion of "equally good").

    1. config     one dataclass
    2. data       strict pairs (prompt, better reply, worse reply) from the built-in rankings or a JSONL
    3. the loop   per step: the policy (with gradient) and the reference (without) score both replies of
                  every pair; AdamW, warmup + cosine, clip; held-out accuracy from the verifier; exact resume

Under torchrun, `--parallel` lays the policy out as sft does (data parallel, ZeRO-1/2/3, tensor parallel; see
glassmind/recipes/sft.py): each replica takes its own pairs of the step (the loss is a mean over pairs, so the
replicas' averaged gradient is the global one). The frozen reference stays a whole plain copy on every rank
(forward only: 4 bytes per parameter, no gradients or optimizer state), even under fsdp or tp, where it can
then outweigh the policy's shard; sharding it too is left for when a model needs it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from glassmind.common import GlassmindError, config_field, print0
from glassmind.data import tasks as task_lib
from glassmind.data.loader import step_indices
from glassmind.train import losses as rl
from glassmind.train import metrics
from glassmind.train.chat_runs import accuracy_row, evaluate_tasks, load_chat_run, require_dir, save_outputs
from glassmind.train.optim import adamw
from glassmind.train.run import ParallelRunSettings, Run, resolve_run_dtype, set_lr, setup_torch
from glassmind.train.schedule import lr_at

SETTINGS = "dpo.json"


@dataclass
class DPOConfig(ParallelRunSettings):
    policy: str = config_field("", "the SFT run: the starting policy and the frozen reference")
    out: str = config_field("runs/dpo", "run directory to write")
    data: Optional[str] = config_field(None, "preference JSONL (as for glassmind reward; default: the built-in "
                                             "preferences)")
    tasks: list[str] = config_field(list(task_lib.TASKS), "built-in tasks")
    n_prefs: int = config_field(2000, "built-in training rankings (each gives its strict pairs)")
    world_seed: int = config_field(0, "seed of the built-in fictional world")
    beta: float = config_field(0.1, "DPO beta: strength of the implicit KL constraint (larger stays closer to "
                                    "the reference)")
    steps: int = config_field(200, "optimizer steps")
    batch_size: int = config_field(32, "preference pairs per step")
    lr: float = config_field(1e-4, "peak learning rate")
    warmup_steps: int = config_field(10, "linear warmup steps")
    min_lr_ratio: float = config_field(0.1, "final lr as a fraction of the peak")
    grad_clip: float = config_field(1.0, "clip the global gradient norm (0: off)")
    seed: int = config_field(0, "seed for the data order")
    eval_every: int = config_field(50, "held-out accuracy every N steps (and at the end)")
    eval_per_task: int = config_field(10, "held-out prompts per task in each evaluation")
    final_eval_per_task: int = config_field(50, "held-out prompts per task in the final evaluation")
    ckpt_every: int = config_field(50, "checkpoint every N steps (and at the end)")


def preference_pairs(prefs: list[task_lib.Preference]) -> list[tuple[list[dict], str, str]]:
    """(prompt, better, worse) for every strict pair of every ranking."""
    return [(p.prompt, p.responses[i], p.responses[j]) for p in prefs for i, j in p.pairs()]


def fitting_pairs(fmt, pairs, context: int):
    """The pairs whose prompt + longer reply fit the context (a cut reply would be a different reply)."""
    def fits(pair) -> bool:
        prompt = len(fmt.render_prompt(pair[0]))
        return prompt + max(len(fmt.render_reply(pair[1])), len(fmt.render_reply(pair[2]))) <= context

    kept = [p for p in pairs if fits(p)]
    if len(kept) < len(pairs):
        print0(f"warning: {len(pairs) - len(kept)} of {len(pairs)} pairs exceed the context ({context}) and are "
               "left out")
    if not kept:
        raise GlassmindError(f"no preference pair fits the model's context ({context} tokens): shorten the data")
    return kept


def pair_batch(fmt, pairs):
    """Chosen rows then rejected rows: ids (2N, T), attention (2N, T), reply mask (2N, T-1)."""
    prompts, replies = [], []
    for side in (1, 2):
        for pair in pairs:
            prompts.append(fmt.render_prompt(pair[0]))
            replies.append(fmt.render_reply(pair[side]))
    return rl.rollout_batch(prompts, replies, fmt.pad_id, fmt.end_id)


def policy_logprobs(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """log pi(ids[t+1] | ids[:t+1]) (B, T-1) through the model's forward (B, T, V), the one call a DDP or FSDP
    wrapper syncs gradients around (rl.forward_logprobs calls .features and .lm_logits, past the wrapper)."""
    return rl.gather_logprobs(model(ids, attention_mask=attn)[:, :-1], ids[:, 1:])


def dpo(cfg: DPOConfig) -> dict:
    from glassmind.parallel import apply_parallel
    from glassmind.parallel.mesh import init_distributed
    from glassmind.parallel.runtime import on_rank0, parallel_layout, rank0_copy, replica_rows, whole_model

    t_start = time.perf_counter()
    require_dir(cfg.policy, "--policy")
    for name in ("steps", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise GlassmindError(f"--{name.replace('_', '-')} must be positive")
    if cfg.beta <= 0:
        raise GlassmindError("--beta must be > 0")
    cfg, dtype_reason = resolve_run_dtype(cfg, SETTINGS, allowed=("fp32", "bf16"))  # auto -> what this CPU does fast
    spec = parallel_layout(cfg.parallel, "dpo", parent=Path(cfg.policy), batch_size=cfg.batch_size, unit="pairs", dtype=cfg.dtype)
    setup_torch(cfg.threads)
    mesh = init_distributed(spec, "cpu")  # None for one process
    run = Run(cfg, SETTINGS)
    out = run.start(extra={"dtype_reason": dtype_reason})

    policy, tok, fmt = load_chat_run(cfg.policy, "--policy")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    prefs = (task_lib.read_preferences_jsonl(cfg.data) if cfg.data
             else task_lib.builtin_preferences("rl", cfg.n_prefs, cfg.seed, cfg.tasks, cfg.world_seed))
    pairs = preference_pairs(prefs)
    if not pairs:
        raise GlassmindError("the preferences hold no strict pair (every ranking is a tie): nothing to prefer")
    pairs = fitting_pairs(fmt, pairs, policy.config.context_length)
    heldout = task_lib.heldout_examples(cfg.eval_per_task, cfg.tasks, cfg.world_seed)
    print0(f"dpo: {len(pairs):,} preference pairs from {len(prefs):,} rankings, beta {cfg.beta}"
           + (f", layout {spec}" if mesh is not None else ""))

    copy0 = rank0_copy(policy)  # rank 0's one-process model for evaluation and the run's files
    pm = apply_parallel(policy, spec, mesh)  # one process: the model as it is
    optimizer = pm.wrap_optimizer(adamw(pm.module, lr=cfg.lr, weight_decay=0.0))
    log = run.log
    step, _ = run.resume(pm, optimizer)

    def save_checkpoint() -> None:
        run.checkpoint(pm, step, optimizer=optimizer)
        whole = whole_model(pm, copy0)
        on_rank0(lambda: save_outputs(out, whole, tok))

    def heldout_accuracy(examples) -> dict:
        """evaluate_tasks on rank 0's whole model (the policy itself for one process), on every rank."""
        whole = whole_model(pm, copy0)
        return on_rank0(lambda: evaluate_tasks(whole, fmt, examples))

    first = None
    if step == 0:
        first = {"step": 0, "split": "heldout", **accuracy_row(heldout_accuracy(heldout))}
        log.log(first)
    pm.module.eval()  # no dropout: pi and pi_ref must be the same function at step 0 (margin exactly 0)
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, max_lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, decay="cosine",
                   min_lr_ratio=cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        batch = [pairs[i] for i in step_indices(step, cfg.batch_size, len(pairs), cfg.seed)]
        ids, attn, mask = pair_batch(fmt, batch)     # (2N, T): chosen rows, then rejected rows
        # this replica's pairs: its chosen rows and their rejected rows, padded as the global batch is
        mine = replica_rows(pm, cfg.batch_size)
        n = mine.stop - mine.start
        rows = torch.cat([torch.arange(len(batch))[mine], len(batch) + torch.arange(len(batch))[mine]])
        ids, attn, mask = ids[rows], attn[rows], mask[rows]
        with pm.grad_sync(True), pm.autocast():
            seq = rl.sequence_logprob(policy_logprobs(pm.module, ids, attn), mask)          # (2n,)
            with torch.no_grad():
                ref_seq = rl.sequence_logprob(rl.forward_logprobs(ref, ids, attn)[1], mask)
            loss, margin = rl.dpo_loss(seq[:n], seq[n:], ref_seq[:n], ref_seq[n:], cfg.beta)
            loss.backward()
        loss_value = pm.global_loss(loss.detach())
        grad_norm = run.optimizer_step(pm, optimizer, loss_value, step=step, grad_clip=cfg.grad_clip).grad_norm
        step += 1
        with torch.no_grad():
            chosen_r = cfg.beta * (seq[:n] - ref_seq[:n])
            rejected_r = cfg.beta * (seq[n:] - ref_seq[n:])
            # per-replica means over equal shares of the pairs -> means over the global batch
            means = pm.global_sum(torch.stack([margin.mean(), (margin > 0).float().mean(), chosen_r.mean(),
                                               rejected_r.mean()]).double()) / pm.dp_size
        row = {"step": step, "tokens": step * cfg.batch_size, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
               **dict(zip(("margin", "pair_acc", "reward_chosen", "reward_rejected"), (float(v) for v in means)))}
        if run.due(cfg.eval_every, step, cfg.steps):
            row.update(accuracy_row(heldout_accuracy(heldout)))
        log.log(row)
        if cfg.progress and (step % 20 == 0 or step == cfg.steps or "heldout_acc" in row):
            acc = f"  held-out acc {row['heldout_acc']:.3f}" if "heldout_acc" in row else ""
            print0(f"dpo step {step}/{cfg.steps}  loss {row['loss']:.4f}  margin {row['margin']:+.3f}  "
                   f"pair acc {row['pair_acc']:.2f}{acc}  {(time.perf_counter() - t0) * 1000:.0f} ms/step")
        if run.due(cfg.ckpt_every, step, cfg.steps):
            save_checkpoint()

    if run.needs_final_checkpoint(step):
        save_checkpoint()
    final = heldout_accuracy(task_lib.heldout_examples(cfg.final_eval_per_task, cfg.tasks, cfg.world_seed))
    first = first or next((r for r in log.rows() if r.get("split") == "heldout"), {})
    train_rows = [r for r in log.rows() if "margin" in r]
    summary = {"run": str(out), "steps": step, "heldout_acc_start": first.get("heldout_acc"),
               "heldout_acc": final["accuracy"], **{f"acc_{t}": a for t, a in final["per_task"].items()},
               "final_loss": train_rows[-1]["loss"] if train_rows else None,
               "final_margin": train_rows[-1]["margin"] if train_rows else None,
               "seconds": time.perf_counter() - t_start}
    metrics.plot_loss(log.rows(), out / "loss.png", title=f"{out.name}: DPO")
    metrics.write_card(
        out, title=f"{out.name}: DPO",
        what=(f"Direct preference optimisation of {cfg.policy} (also the frozen reference), beta {cfg.beta}, {step} "
              f"steps of {cfg.batch_size} pairs from {cfg.data or 'the built-in rankings'}."
              + f" Computed in {cfg.dtype} ({dtype_reason})."),
        parent=cfg.policy, numbers={k: v for k, v in summary.items() if k != "run" and v is not None},
        config={**dataclasses.asdict(cfg), "dtype_reason": dtype_reason}, plots=["loss.png"])
    print0(f"dpo done: held-out accuracy {summary['heldout_acc']:.3f}, {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from glassmind.parallel.runtime import recipe_main

    return recipe_main(dpo, DPOConfig, argv, prog="glassmind dpo", settings_file=SETTINGS,
                       description="Direct preference optimisation against the frozen SFT reference.")


if __name__ == "__main__":
    import sys

    sys.exit(main())
