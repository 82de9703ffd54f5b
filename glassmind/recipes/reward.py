"""`glassmind reward --from SFT_RUN`: a reward model trained on ranked responses with the Bradley-Terry loss.

    1. the model     the SFT transformer (its final hidden states) + a ScalarHead; the score of a sequence is
                     the head's output at its last real token (the <|end|> that closes the reply)
    2. the data      rankings of K replies per prompt: built-in (glassmind.data.tasks) or a preference JSONL
                     (pairs, K-way rankings, `glassmind rank` output)
    3. the loss      every pair a ranking implies, -log sigmoid(s_better - s_worse), ties as half a win each
                     way (rl.bradley_terry_loss); InstructGPT (Ouyang et al. 2022, sec. 3.5) puts all K(K-1)/2
                     pairs of a prompt in one batch element, as here, which is cheaper (K forward passes for
                     K(K-1)/2 comparisons) and does not overfit the way shuffled single pairs do
    4. the loop      AdamW, warmup + cosine, clip, held-out pairwise accuracy, checkpoint, exact resume

The run directory holds the trunk as a plain model (config.json, model.safetensors: `glassmind.model.load_model`
reads it) and the head in reward_head.safetensors; `glassmind.train.reward_model.load_reward_model` puts them
together (the model, its files and how it scores rankings are nouns in glassmind/train/reward_model.py).

Under torchrun, `--parallel` lays the reward model (trunk and head) out as sft does (data parallel, ZeRO-1/2/3,
tensor parallel; see glassmind/recipes/sft.py): each replica scores its own rankings of the step and divides
its Bradley-Terry sum by the global batch's pair weight. Plain DDP needs every trunk parameter to take part in
the score, so a parent with an untied output head (unused here) takes zero=2|3 or tp instead.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

from glassmind.common import GlassmindError, config_field, print0
from glassmind.data import tasks as task_lib
from glassmind.data.loader import step_indices
from glassmind.train import losses as rl
from glassmind.train import metrics
from glassmind.train.chat_runs import load_chat_run, require_dir
from glassmind.train.optim import adamw
from glassmind.train.reward_model import (SCORES, RewardModel, pair_weight, pairwise_accuracy, ranking_loss,
                                          render_preference, score_rankings)
from glassmind.train.run import ParallelRunSettings, Run, resolve_run_dtype, set_lr, setup_torch
from glassmind.train.schedule import lr_at

SETTINGS = "reward.json"

# ======================================================================================================
# 1. Configuration and data
# ======================================================================================================


@dataclass
class RewardConfig(ParallelRunSettings):
    parent: str = config_field("", "the SFT run the reward model starts from; flag --from")
    out: str = config_field("runs/reward", "run directory to write")
    data: Optional[str] = config_field(None, "preference JSONL: {prompt, chosen, rejected} or {prompt, responses, "
                                             "ranking} (default: the built-in preferences)")
    val_fraction: float = config_field(0.1, "with --data: fraction of prompts held out (by a hash of the prompt)")
    tasks: list[str] = config_field(list(task_lib.TASKS), "built-in tasks")
    n_prefs: int = config_field(4000, "built-in training rankings (K = 5 replies each)")
    eval_prefs: int = config_field(120, "built-in held-out rankings for the pairwise accuracy")
    world_seed: int = config_field(0, "seed of the built-in fictional world")
    steps: int = config_field(300, "optimizer steps")
    batch_size: int = config_field(8, "rankings per step (all their pairs)")
    lr: float = config_field(3e-4, "peak learning rate")
    warmup_steps: int = config_field(20, "linear warmup steps")
    min_lr_ratio: float = config_field(0.1, "final lr as a fraction of the peak")
    weight_decay: float = config_field(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = config_field(1.0, "clip the global gradient norm (0: off)")
    seed: int = config_field(0, "seed for the data order and the head's init")
    eval_every: int = config_field(100, "evaluate every N steps (and at the end)")
    score: str = config_field("head", "head: the scalar head on the last token; head+loglik: plus the trunk's "
                                      "log-likelihood of the reply tokens (see RewardModel)", choices=SCORES)
    freeze_trunk: bool = config_field(False, "train the head only; the trunk stays the SFT model it starts from")


def preferences(cfg: RewardConfig) -> tuple[list[task_lib.Preference], list[task_lib.Preference]]:
    """(train, held-out) rankings. User data is split by a hash of each prompt, so a prompt's rankings are
    all on one side."""
    if cfg.data:
        prefs = task_lib.read_preferences_jsonl(cfg.data)
        key = lambda p: task_lib._unit_hash("val:" + repr(p.prompt))  # noqa: E731
        train = [p for p in prefs if key(p) >= cfg.val_fraction]
        val = [p for p in prefs if key(p) < cfg.val_fraction]
        if not train:
            raise GlassmindError(f"{cfg.data}: every prompt fell in the held-out split; lower --val-fraction")
        return train, val
    return (task_lib.builtin_preferences("rl", cfg.n_prefs, cfg.seed, cfg.tasks, cfg.world_seed),
            task_lib.builtin_preferences("heldout", cfg.eval_prefs, cfg.seed, cfg.tasks, cfg.world_seed))


# ======================================================================================================
# 2. The loop
# ======================================================================================================


def train_reward(cfg: RewardConfig) -> dict:
    from glassmind.parallel import apply_parallel
    from glassmind.parallel.mesh import init_distributed
    from glassmind.parallel.runtime import on_rank0, parallel_layout, rank0_copy, replica_rows, whole_model

    t_start = time.perf_counter()
    parent = require_dir(cfg.parent, "--from")
    for name in ("steps", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise GlassmindError(f"--{name.replace('_', '-')} must be positive")
    if cfg.score not in SCORES:
        raise GlassmindError(f"--score {cfg.score!r}: use one of {', '.join(SCORES)}")
    cfg, dtype_reason = resolve_run_dtype(cfg, SETTINGS, allowed=("fp32", "bf16"))  # auto -> what this CPU does fast
    spec = parallel_layout(cfg.parallel, "reward", parent=parent, batch_size=cfg.batch_size, unit="rankings", dtype=cfg.dtype)
    if spec.world > 1 and (cfg.score != "head" or cfg.freeze_trunk):
        raise GlassmindError(f"--parallel {spec}: --score head+loglik and --freeze-trunk run in one process only")
    if spec.world > 1 and spec.zero < 2 and spec.tp == 1:
        from glassmind.model import load_config

        mc = load_config(parent)
        if not mc.tie_embeddings or mc.lm_head_bias:
            raise GlassmindError(f"--parallel {spec}: {parent} has an untied output head, which the reward model "
                                 "does not use, and DDP needs every parameter in the backward pass: use zero=2, "
                                 "zero=3 or tp")
    setup_torch(cfg.threads)
    mesh = init_distributed(spec, "cpu")  # None for one process
    run = Run(cfg, SETTINGS)
    out = run.start(extra={"dtype_reason": dtype_reason})

    trunk, tok, fmt = load_chat_run(parent, "--from")
    torch.manual_seed(cfg.seed)  # the head's init
    rm = RewardModel(trunk, reply_start_id=fmt.role_ids["assistant"] if cfg.score == "head+loglik" else None)
    if cfg.freeze_trunk:
        rm.trunk.requires_grad_(False)  # the optimizer then moves the head alone (a parameter without grad stays)
    context = rm.config.context_length
    train, val = preferences(cfg)
    print0(f"reward: {len(train):,} training rankings ({sum(len(p.pairs()) for p in train):,} strict pairs), "
           f"{len(val):,} held out; {rm.trunk.num_params():,} + {sum(p.numel() for p in rm.head.parameters())} "
           "parameters" + (f", layout {spec}" if mesh is not None else ""))

    copy0 = rank0_copy(rm)  # rank 0's one-process model for evaluation and the run's files
    pm = apply_parallel(rm, spec, mesh)  # one process: the model as it is
    optimizer = pm.wrap_optimizer(adamw(pm.module, lr=cfg.lr, weight_decay=cfg.weight_decay))
    log = run.log
    step, _ = run.resume(pm, optimizer)

    def save_checkpoint() -> None:
        run.checkpoint(pm, step, optimizer=optimizer)
        whole = whole_model(pm, copy0)
        on_rank0(lambda: (whole.save(out), tok.save(out)))

    def run_eval() -> dict:
        whole = whole_model(pm, copy0)  # one process: the model; under a layout: rank 0's gathered copy

        def evaluate() -> dict:
            whole.eval()
            row = {"step": step, "tokens": step * cfg.batch_size, "split": "heldout",
                   **pairwise_accuracy(whole, fmt, val)}
            whole.train()
            return row

        row = on_rank0(evaluate)
        log.log(row)
        return row

    first = run_eval() if step == 0 and val else None
    pm.module.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, max_lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, decay="cosine",
                   min_lr_ratio=cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        batch = [train[i] for i in step_indices(step, cfg.batch_size, len(train), cfg.seed)]
        # this replica's rankings, padded to the global batch's length; its loss sum is divided by the global
        # pair weight / dp, so the replicas' averaged gradient is that of the global mean
        mine = batch[replica_rows(pm, cfg.batch_size)]
        length = weight = None
        if pm.dp_size > 1:
            length = max(len(s) for p in batch for s in render_preference(fmt, p, context))
            weight = max(pair_weight(batch), 1.0) / pm.dp_size
        with pm.grad_sync(True), pm.autocast():
            scores = score_rankings(pm.module, fmt, mine, context=context, length=length)
            loss = ranking_loss(scores, mine, weight=weight)
            loss.backward()
        loss = pm.global_loss(loss.detach())
        grad_norm = run.optimizer_step(pm, optimizer, loss, step=step, grad_clip=cfg.grad_clip).grad_norm
        step += 1
        with torch.no_grad():
            right = sum(rl.pairwise_accuracy(s, p.ranks)[0] for s, p in zip(scores, mine))
            n = sum(rl.pairwise_accuracy(s, p.ranks)[1] for s, p in zip(scores, mine))
        right, n = (float(v) for v in pm.global_sum([right, n]))
        log.log({"step": step, "tokens": step * cfg.batch_size, "loss": loss, "lr": lr,
                 "grad_norm": grad_norm, "train_pair_acc": right / max(n, 1)})
        if cfg.progress and (step % 20 == 0 or step == cfg.steps):
            print0(f"reward step {step}/{cfg.steps}  loss {loss:.4f}  batch pair acc {right / max(n, 1):.3f}  "
                   f"{(time.perf_counter() - t0) * 1000:.0f} ms/step")
        if run.due(cfg.eval_every, step, cfg.steps) and val:
            print0(f"  eval: held-out pairwise accuracy {run_eval()['pairwise_acc']:.3f}")
        if run.due(cfg.ckpt_every, step, cfg.steps):
            save_checkpoint()

    final = run_eval() if val else {}
    if run.needs_final_checkpoint(step):
        save_checkpoint()
    first = first or next((r for r in log.rows() if r.get("split") == "heldout"), final)
    metrics.plot_loss(log.rows(), out / "loss.png", title=f"{out.name}: reward model (Bradley-Terry)")
    summary = {"run": str(out), "steps": step, "pairwise_acc_start": first.get("pairwise_acc"),
               "pairwise_acc": final.get("pairwise_acc"),
               "acc_correct_vs_near_miss": final.get("acc_correct_vs_near_miss"),
               "heldout_pairs": final.get("pairs"), "seconds": time.perf_counter() - t_start}
    metrics.write_card(
        out, title=f"{out.name}: reward model",
        what=("Reward model = the SFT transformer + a scalar head on the last token"
              + (" + the trunk's log-likelihood of the reply" if cfg.score == "head+loglik" else "")
              + (" (trunk frozen)" if cfg.freeze_trunk else "") + f", initialised from {parent}, "
              f"trained {step} steps with the Bradley-Terry loss over every pair of {cfg.batch_size} rankings per "
              f"step ({cfg.data or 'built-in preferences, K = 5, rule in glassmind/data/tasks.py'})."
              + f" Computed in {cfg.dtype} ({dtype_reason})."),
        parent=str(parent), numbers={k: v for k, v in summary.items() if k != "run" and v is not None},
        config={**dataclasses.asdict(cfg), "dtype_reason": dtype_reason}, plots=["loss.png"])
    if final:
        print0(f"reward done: held-out pairwise accuracy {summary['pairwise_acc_start']:.3f} -> "
               f"{summary['pairwise_acc']:.3f} over {summary['heldout_pairs']} pairs, {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from glassmind.parallel.runtime import recipe_main

    return recipe_main(train_reward, RewardConfig, argv, prog="glassmind reward", settings_file=SETTINGS,
                       description="Train a reward model on ranked responses (Bradley-Terry).", renames={"parent": "--from"})


if __name__ == "__main__":
    import sys

    sys.exit(main())
