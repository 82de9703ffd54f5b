"""`glassmind sft --from RUN`: supervised fine-tuning (instruction tuning) with a loss on the assistant's
tokens only. One loop you read top to bottom:

    1. config        one dataclass (the run settings every verb shares come from train.run.RunSettings)
    2. data          conversations (built-in tasks or a JSONL of `messages`) -> ids + loss masks
    3. the model     the parent's weights; its vocabulary grows by the chat tokens if needed
    4. the loop      masked cross-entropy, AdamW, warmup + cosine, the one optimizer_step, eval, checkpoint

Exact resume. The batch of step s is a pure function of (seed, s) (a permutation per epoch), the learning
rate a function of s, and the shared train-state checkpoint holds weights, AdamW moments and every RNG, so a
run killed at any instant and resumed with --resume ends with the same weights, bit for bit, on CPU.

Distributed. `torchrun --nproc_per_node=N -m glassmind sft|reward|dpo --parallel LAYOUT` lays a run over N
processes (glassmind/parallel applies the layout from outside): data parallel (dp=N, with ZeRO-1/2/3 as
zero=K or fsdp=N) and tensor parallel (tp=N), bf16 compute with mp=bf16. Each data-parallel replica takes
its own rows of every global batch and its loss is normalised by the global batch's count (assistant tokens,
comparisons, pairs), so the gradient and the logged loss are those of one process on the whole batch.
Checkpoints are gathered to rank 0 in the one-process format (a run resumes under any layout, or none), only
rank 0 writes files, and held-out evaluation runs on rank 0 on the gathered model. Not supported: pipeline
stages (a pipeline schedule runs a fixed causal-LM loss; these verbs have their own losses) and fp16 (no loss
scaler here). `ppo` and `grpo` refuse torchrun: each step generates rollouts through the inference engine,
which runs a whole plain model; data parallelism would fit (each replica rolls out its own prompts), sharded
and tensor-parallel layouts would need a gather before every rollout phase; not done yet.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from glassmind.common import GlassmindError, config_field, print0
from glassmind.data import tasks as task_lib
from glassmind.data.loader import step_indices
from glassmind.tokenizer.chat import ChatFormat, add_chat_tokens
from glassmind.train import metrics
from glassmind.train.chat_runs import accuracy_row, evaluate_tasks, require_dir, save_outputs
from glassmind.train.optim import adamw
from glassmind.train.run import ParallelRunSettings, Run, resolve_run_dtype, set_lr, setup_torch
from glassmind.train.schedule import lr_at

# ======================================================================================================
# 1. Configuration
# ======================================================================================================


SETTINGS = "sft.json"


@dataclass
class SFTConfig(ParallelRunSettings):
    parent: str = config_field("", "the run to fine-tune (a pre-trained decoder with a BPE tokenizer); flag --from")
    out: str = config_field("runs/sft", "run directory to write")
    data: Optional[str] = config_field(None, "JSONL of {\"messages\": [...]} conversations (default: the "
                                             "built-in tasks)")
    tasks: list[str] = config_field(list(task_lib.TASKS), "built-in tasks to train on")
    n_examples: int = config_field(20000, "built-in training examples drawn (the pools repeat where they are small)")
    world_seed: int = config_field(0, "seed of the built-in fictional world")
    steps: int = config_field(400, "optimizer steps")
    batch_size: int = config_field(32, "conversations per step")
    lr: float = config_field(1e-3, "peak learning rate")
    warmup_steps: int = config_field(20, "linear warmup steps")
    min_lr_ratio: float = config_field(0.1, "final lr as a fraction of the peak (cosine decay)")
    weight_decay: float = config_field(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = config_field(1.0, "clip the global gradient norm (0: off)")
    seed: int = config_field(0, "seed for the data order")
    eval_every: int = config_field(100, "evaluate every N steps (and at the end)")
    eval_per_task: int = config_field(20, "held-out prompts per task in each evaluation")


# ======================================================================================================
# 2. Data
# ======================================================================================================


def conversations(cfg: SFTConfig) -> list[list[dict]]:
    if cfg.data:
        return task_lib.read_sft_jsonl(cfg.data)
    return [e.messages() for e in task_lib.train_examples(cfg.n_examples, cfg.seed, cfg.tasks, cfg.world_seed, "sft")]


def render_all(fmt: ChatFormat, convs: Sequence[list[dict]], context: int) -> list[tuple[list[int], list[int]]]:
    """Render every conversation; one longer than the context is cut to it (its tail is lost), and said."""
    rendered = [fmt.render(c) for c in convs]
    too_long = sum(len(ids) > context for ids, _ in rendered)
    if too_long:
        print0(f"warning: {too_long} of {len(rendered)} conversations exceed the context ({context}) and are cut")
    rendered = [(ids[:context], mask[:context]) for ids, mask in rendered]
    kept = [r for r in rendered if sum(r[1]) > 0]
    if not kept:
        raise GlassmindError("no conversation has an assistant token inside the context: shorten them")
    return kept


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids (B, T), attention (B, T), loss mask (B, T)."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
        mask[i, :len(m)] = torch.tensor(m)
    return ids, attn, mask


def masked_lm_loss(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor, *,
                   total: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of predicting ids[t+1] from ids[:t+1], averaged over the positions where mask[t+1] = 1
    (the assistant's tokens): logits (B, T-1, V) against targets (B, T-1). `total` replaces the count of
    those positions (a data-parallel replica divides its sum by the global batch's count / replicas)."""
    logits = model(ids, attention_mask=attn)[:, :-1]
    targets = ids[:, 1:]
    weight = mask[:, 1:].float()
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * weight.reshape(-1)).sum() / (weight.sum().clamp(min=1) if total is None else total)


# ======================================================================================================
# 3. The model: the parent's weights, the vocabulary grown by the chat tokens
# ======================================================================================================


def resize_vocab(model: nn.Module, vocab_size: int) -> nn.Module:
    """A copy of `model` with `vocab_size` token rows. New rows of the embedding (and of an untied output
    head) start at the mean of the existing rows, so a new token's logit starts near the average one instead
    of at an arbitrary scale (Hewitt 2021, "Initializing new word embeddings for pretrained language
    models"); new output biases start at their mean too."""
    from glassmind.model import Transformer

    old = model.config.vocab_size
    if vocab_size <= old:
        return model
    cfg = dataclasses.replace(model.config, vocab_size=vocab_size)
    new = Transformer(cfg)
    state = model.state_dict()
    grown = {}
    for name, t in state.items():
        if name in ("token_embedding.weight", "lm_head.weight", "lm_bias"):
            extra = t.mean(0, keepdim=True).expand(vocab_size - old, *t.shape[1:])
            grown[name] = torch.cat([t, extra], 0)
        else:
            grown[name] = t
    new.load_state_dict(grown)
    return new


def chat_model(parent: Path):
    """(model, tokenizer, ChatFormat) for SFT: the parent's tokenizer with the chat tokens added (a no-op if
    the parent was instruction-tuned already) and its model with the vocabulary to match."""
    from glassmind import tokenizer as tok_lib
    from glassmind.model import load_model

    tok = tok_lib.load(parent)
    add_chat_tokens(tok)
    model = load_model(parent)
    if model.config.arch != "decoder":
        raise GlassmindError(f"{parent} holds a {model.config.arch}: instruction tuning here takes a decoder")
    model = resize_vocab(model, tok.vocab_size)
    fmt = ChatFormat(tok)
    model.config.pad_token_id = fmt.pad_id
    return model, tok, fmt


# ======================================================================================================
# 4. The loop
# ======================================================================================================


def sft(cfg: SFTConfig) -> dict:
    """Run (or resume) SFT; returns the key numbers (also in card.md). Under torchrun, every rank calls it."""
    from glassmind.parallel import apply_parallel
    from glassmind.parallel.mesh import init_distributed
    from glassmind.parallel.runtime import on_rank0, parallel_layout, rank0_copy, replica_rows, whole_model

    t_start = time.perf_counter()
    parent = require_dir(cfg.parent, "--from")
    for name in ("steps", "batch_size", "n_examples"):
        if getattr(cfg, name) <= 0:
            raise GlassmindError(f"--{name.replace('_', '-')} must be positive")
    cfg, dtype_reason = resolve_run_dtype(cfg, SETTINGS, allowed=("fp32", "bf16"))  # auto -> what this CPU does fast
    spec = parallel_layout(cfg.parallel, "sft", parent=parent, batch_size=cfg.batch_size, unit="conversations", dtype=cfg.dtype)
    setup_torch(cfg.threads)
    mesh = init_distributed(spec, "cpu")  # the alignment verbs compute on the CPU: gloo; None for one process
    run = Run(cfg, SETTINGS)
    out = run.start(extra={"dtype_reason": dtype_reason})

    model, tok, fmt = chat_model(parent)
    rows = render_all(fmt, conversations(cfg), model.config.context_length)
    heldout = task_lib.heldout_examples(cfg.eval_per_task, cfg.tasks, cfg.world_seed)
    val_rows = render_all(fmt, [e.messages() for e in heldout], model.config.context_length)
    print0(f"sft: {len(rows):,} conversations, {model.num_params():,} parameters, vocab {tok.vocab_size}"
           + (f", layout {spec}" if mesh is not None else ""))

    copy0 = rank0_copy(model)  # rank 0's one-process model for evaluation and the run's files
    pm = apply_parallel(model, spec, mesh)  # one process: the model as it is
    optimizer = pm.wrap_optimizer(adamw(pm.module, lr=cfg.lr, weight_decay=cfg.weight_decay))
    log = run.log
    step, info = run.resume(pm, optimizer)
    tokens_done = info["extra"].get("tokens", 0)  # assistant (target) tokens trained on so far

    def save_checkpoint() -> None:
        run.checkpoint(pm, step, optimizer=optimizer, extra={"tokens": tokens_done})
        whole = whole_model(pm, copy0)
        on_rank0(lambda: save_outputs(out, whole, tok))

    def run_eval() -> dict:
        whole = whole_model(pm, copy0)  # one process: the model; under a layout: rank 0's gathered copy

        def evaluate() -> dict:
            whole.eval()
            with torch.no_grad():
                val_loss = float(masked_lm_loss(whole, *collate(val_rows, fmt.pad_id)))
            result = evaluate_tasks(whole, fmt, heldout)
            whole.train()
            return {"step": step, "tokens": tokens_done, "split": "val", "val_loss": val_loss, **accuracy_row(result)}

        row = on_rank0(evaluate)
        log.log(row)
        return row

    pm.module.train()
    first = run_eval() if step == 0 else None
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, max_lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, decay="cosine",
                   min_lr_ratio=cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        batch = collate([rows[i] for i in step_indices(step, cfg.batch_size, len(rows), cfg.seed)], fmt.pad_id)
        # this replica's rows (B / dp, T) of the global batch; its sum of token losses is divided by the global
        # count / dp, so the replicas' averaged gradient is the gradient of the global mean
        mine = replica_rows(pm, cfg.batch_size)
        total = batch[2][:, 1:].sum().clamp(min=1) / pm.dp_size if pm.dp_size > 1 else None
        with pm.grad_sync(True), pm.autocast():
            loss = masked_lm_loss(pm.module, *(t[mine] for t in batch), total=total)
            loss.backward()
        loss = pm.global_loss(loss.detach())
        grad_norm = run.optimizer_step(pm, optimizer, loss, step=step, grad_clip=cfg.grad_clip).grad_norm
        step += 1
        tokens_done += int(batch[2][:, 1:].sum())
        dt = time.perf_counter() - t0
        log.log({"step": step, "tokens": tokens_done, "loss": loss, "lr": lr,
                 "grad_norm": grad_norm, "tokens_per_s": int(batch[1].sum()) / dt})
        if cfg.progress and (step % 20 == 0 or step == cfg.steps):
            print0(f"sft step {step}/{cfg.steps}  loss {loss:.4f}  lr {lr:.2e}  {dt * 1000:.0f} ms/step")
        if run.due(cfg.eval_every, step, cfg.steps):
            row = run_eval()
            print0(f"  eval: val loss {row['val_loss']:.4f}, held-out accuracy {row['heldout_acc']:.3f}")
        if run.due(cfg.ckpt_every, step, cfg.steps):
            save_checkpoint()

    final = run_eval()
    if run.needs_final_checkpoint(step):
        save_checkpoint()
    rows_logged = log.rows()
    first = first or next((r for r in rows_logged if r.get("split") == "val"), final)
    metrics.plot_loss(rows_logged, out / "loss.png", title=f"{out.name}: SFT")
    summary = {"run": str(out), "steps": step, "val_loss_start": first["val_loss"], "val_loss": final["val_loss"],
               "heldout_acc_start": first["heldout_acc"], "heldout_acc": final["heldout_acc"],
               **{k: v for k, v in final.items() if k.startswith("acc_")},
               "seconds": time.perf_counter() - t_start}
    metrics.write_card(
        out, title=f"{out.name}: instruction-tuned (SFT)",
        what=(f"Supervised fine-tuning of {parent} for {step} steps of {cfg.batch_size} conversations "
              f"({'built-in tasks ' + ', '.join(cfg.tasks) if not cfg.data else cfg.data}), loss on assistant "
              "tokens only; chat tokens " + ", ".join(fmt.tokenizer.special_tokens) + "."
              + f" Computed in {cfg.dtype} ({dtype_reason})."),
        parent=str(parent), numbers={k: v for k, v in summary.items() if k != "run"},
        config={**dataclasses.asdict(cfg), "dtype_reason": dtype_reason}, plots=["loss.png"])
    print0(f"sft done: held-out accuracy {summary['heldout_acc_start']:.3f} -> {summary['heldout_acc']:.3f}, {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from glassmind.parallel.runtime import recipe_main

    return recipe_main(sft, SFTConfig, argv, prog="glassmind sft", settings_file=SETTINGS,
                       description="Instruction-tune a pre-trained decoder with the loss on assistant tokens.", renames={"parent": "--from"})


if __name__ == "__main__":
    import sys

    sys.exit(main())
