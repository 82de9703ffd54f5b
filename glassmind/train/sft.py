"""`glassmind sft --from RUN`: supervised fine-tuning (instruction tuning) with a loss on the assistant's
tokens only, and the plumbing every alignment verb shares.

    1. shared        run directories that resume exactly, loading a chat run, generating replies through the
                     inference engine, held-out task accuracy from the verifier
    2. config        one dataclass; flags come from its fields
    3. data          conversations (built-in tasks or a JSONL of `messages`) -> ids + loss masks
    4. the model     the parent's weights; its vocabulary grows by the chat tokens if needed
    5. the loop      masked cross-entropy, AdamW, warmup + cosine, clip, eval, checkpoint, resume

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

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from glassmind.common import (GlassmindError, add_config_args, atomic_write_json, config_from_args, is_rank0,
                              print0, run_main)
from glassmind.data import tasks as task_lib
from glassmind.tokenizer.chat import ChatFormat, add_chat_tokens
from glassmind.train import checkpoint, metrics
from glassmind.train.optim import adamw
from glassmind.train.schedule import lr_at

# ======================================================================================================
# 1. Shared by the alignment verbs (reward, ppo, dpo, grpo, rank, the demo)
# ======================================================================================================


def setup_torch(threads: Optional[int]) -> None:
    """Deterministic kernels (exact resume) and an optional thread count."""
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def parse_config(cls: type, argv: Sequence[str] | None, *, prog: str, description: str, settings_file: str,
                 renames: dict[str, str] | None = None):
    """Flags from the dataclass `cls`; `renames` maps a field to its flag (sft's `parent` is `--from`).
    With --resume the run's saved settings are the defaults, so `--out RUN --resume` is enough; except the
    layout (--parallel), which belongs to the launch: a run resumes under whatever layout it is given."""
    renames = renames or {}
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog="Resume a killed run with: " + prog + " --out RUN --resume")
    add_config_args(parser, cls, skip=renames)
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, flag in renames.items():
        parser.add_argument(flag, dest=name, default=hints[name].default, help=hints[name].metadata.get("help"))
    ns = parser.parse_args(argv)
    saved = Path(ns.out) / settings_file
    if ns.resume and saved.exists():
        settings = json.loads(saved.read_text(encoding="utf-8"))
        settings.pop("parallel", None)
        parser.set_defaults(**settings)
        ns = parser.parse_args(argv)
    return config_from_args(cls, ns)


# fields a resumed run may change in every verb: they do not alter what is computed
RESUME_MAY_CHANGE = frozenset({"resume", "threads", "ckpt_every", "keep_last", "progress",
                               "parallel"})  # checkpoints are layout-free


def prepare_out(cfg: Any, settings_file: str, may_change: frozenset = RESUME_MAY_CHANGE) -> Path:
    """A fresh run directory, or the same run resumed with the same settings: never clobber another run.
    Under torchrun every rank checks, then rank 0 alone writes."""
    from glassmind.parallel.runtime import barrier

    refuse_unlaid_processes(Path(settings_file).stem)
    out = checkpoint.check_run_dir(cfg, settings_file, may_change)
    barrier()  # no rank may meet rank 0's new settings file while it still checks for an existing run
    if is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / settings_file, dataclasses.asdict(cfg))
    barrier()
    return out


def refuse_unlaid_processes(verb: str) -> None:
    """torchrun started several processes but this verb did not lay itself out over them (ppo and grpo run in
    one process): N copies would write the same run directory. Say so instead."""
    from glassmind.common import world_size
    from glassmind.parallel.runtime import is_distributed

    if world_size() > 1 and not is_distributed():
        raise GlassmindError(f"glassmind {verb} runs in one process, but torchrun started {world_size()}: run it "
                             "without torchrun. (sft, reward and dpo take --parallel under torchrun; ppo and grpo "
                             "roll out through the inference engine on the whole model and do not)")


def parallel_layout(text: str, verb: str, *, parent: Path, batch_size: int, unit: str):
    """The --parallel layout of an alignment verb, checked before any process group exists, so a wrong one is
    the same clear error on every rank instead of a hang. Data parallel (dp, zero=1|2|3, fsdp) and tensor
    parallel (tp) are supported, with fp32 or bf16 compute."""
    from glassmind.model import load_config
    from glassmind.parallel.mesh import check_model, parse_spec
    from glassmind.parallel.tensor import check_attention_splits

    spec = parse_spec(text)
    supported = f"{verb} runs data parallel (dp=N, zero=1|2|3, fsdp=N) and tensor parallel (tp=N) layouts"
    if spec.pp > 1:
        raise GlassmindError(f"--parallel {spec}: {supported}, not pipeline stages: drop pp (a pipeline schedule "
                             f"runs pretrain's causal-LM loss, not {verb}'s)")
    if spec.mp == "fp16":
        raise GlassmindError(f"--parallel {spec}: {verb} has no fp16 loss scaler; use mp=bf16 or mp=fp32")
    if batch_size % spec.dp:
        raise GlassmindError(f"--parallel {spec}: --batch-size {batch_size} ({unit}) does not split evenly over "
                             f"{spec.dp} data-parallel replicas: use a multiple of {spec.dp}")
    if spec.world > 1:
        config = load_config(parent)
        check_model(spec, config)
        if spec.tp > 1:
            check_attention_splits(config, spec.tp)
    return spec


def replica_rows(pm, n: int) -> slice:
    """This data-parallel replica's rows of a global batch of n (n divisible by the replicas)."""
    per = n // pm.dp_size
    return slice(pm.dp_rank * per, (pm.dp_rank + 1) * per)


def save_state(pm, root: Path, step: int, *, optimizer, keep_last: int, extra: dict | None = None) -> Path:
    """The train-state checkpoint: checkpoint.save for one process; under a layout every rank gathers its
    pieces and rank 0 writes them in the same one-process format."""
    from glassmind.parallel import checkpoint as pckpt

    if pm.mesh is None:
        return checkpoint.save(root, step, model=pm.module, optimizer=optimizer, keep_last=keep_last, extra=extra)
    return pckpt.save_checkpoint(pm, root, step, optimizer=optimizer, extra=extra, keep_last=keep_last)


def save_run_files(out: Path, whole: nn.Module | None, tok) -> None:
    """The loadable files (save_outputs) from rank 0's whole model; the other ranks (whole None) wait."""
    from glassmind.parallel.runtime import on_rank0

    on_rank0(lambda: save_outputs(out, whole, tok))


def resume_state(cfg: Any, out: Path, *, model: nn.Module, optimizer) -> tuple[int, dict, Path | None]:
    """(step, extra, checkpoint path) restored from the newest complete checkpoint, or (0, {}, None).
    `model` may be a ParallelModel: under a layout every rank reads the files and keeps its piece."""
    from glassmind.parallel import ParallelModel, checkpoint as pckpt

    log = metrics.MetricsLog(out)
    latest = checkpoint.latest(out / "train_state") if cfg.resume else None
    step, extra = 0, {}
    if latest is not None:
        if isinstance(model, ParallelModel) and model.mesh is not None:
            restored = pckpt.load_checkpoint(model, latest, optimizer=optimizer)
        else:
            restored = checkpoint.load(latest, optimizer=optimizer,
                                       model=model.module if isinstance(model, ParallelModel) else model)
        step, extra = restored["step"], restored["extra"]
        print0(f"resumed from {latest} (step {step})")
    if cfg.resume:
        log.truncate_after(step)  # rows a killed run wrote after its last checkpoint are recomputed
    return step, extra, latest


def require_dir(path: str, flag: str) -> Path:
    if not path:
        raise GlassmindError(f"{flag} RUN is required: the run directory this stage starts from")
    p = Path(path)
    if not (p / "config.json").exists():
        raise GlassmindError(f"{flag} {path}: no config.json there; give a run directory written by glassmind")
    return p


def load_chat_run(run: str | os.PathLike, flag: str = "--policy"):
    """(model, tokenizer, ChatFormat) of an instruction-tuned run (one `glassmind sft` wrote)."""
    from glassmind import tokenizer as tok_lib
    from glassmind.model import load

    run = require_dir(str(run), flag)
    tok = tok_lib.load(run)
    fmt = ChatFormat(tok)
    model = load(run)
    if model.config.arch != "decoder":
        raise GlassmindError(f"{run} holds a {model.config.arch}: alignment stages take a decoder")
    if tok.vocab_size > model.config.vocab_size:
        raise GlassmindError(f"{run}: the tokenizer has {tok.vocab_size} tokens but the model "
                             f"{model.config.vocab_size}: they are not from the same run")
    return model, tok, fmt


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], eos_id: int, *, max_new_tokens: int,
             temperature: float = 0.0, seed: int | None = None, batch_size: int = 256) -> list[list[int]]:
    """Replies from the inference engine: new ids, the <|end|> included when the model wrote it.
    temperature 0 is greedy; otherwise pure sampling (no top-k/top-p: RL needs the policy's own
    distribution); sequence i of the call uses seed + i, so a seeded call repeats exactly."""
    from glassmind.infer import Engine, SamplingParams

    engine = Engine(model)
    context = model.config.context_length
    keep = context - max(1, min(max_new_tokens, context // 4))  # leave room for a reply
    too_long = sum(len(p) > keep for p in prompts)
    if too_long:  # keep the end of the prompt (the question and the assistant tag); the reply is scored as usual
        print(f"warning: {too_long} of {len(prompts)} prompts exceed the context ({context}) and keep only "
              f"their last {keep} tokens", flush=True)
        prompts = [list(p)[-keep:] for p in prompts]
    room = context - max(len(p) for p in prompts)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        params = SamplingParams(strategy="greedy" if temperature == 0 else "sample", temperature=temperature or 1.0,
                                max_new_tokens=min(max_new_tokens, room), eos_token_ids=(eos_id,), top_logprobs=0,
                                seed=None if seed is None else seed + start)
        out += [list(r.ids) for r in engine.generate(chunk, params)]
    return out


def evaluate_tasks(model: nn.Module, fmt: ChatFormat, examples: Sequence[task_lib.Example], *,
                   max_new_tokens: int = 16) -> dict:
    """Held-out exact-match accuracy, per task and overall, from the verifier (greedy replies)."""
    prompts = [fmt.render_prompt(e.messages()[:1]) for e in examples]
    replies = [fmt.parse_reply(r) for r in generate(model, prompts, fmt.end_id, max_new_tokens=max_new_tokens)]
    return score_replies(examples, replies)


def score_replies(examples: Sequence[task_lib.Example], replies: Sequence[str]) -> dict:
    ok = [task_lib.verify(e, r) for e, r in zip(examples, replies)]
    per_task: dict[str, list[bool]] = {}
    for e, good in zip(examples, ok):
        per_task.setdefault(e.task, []).append(good)
    return {"accuracy": sum(ok) / max(len(ok), 1),
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
            "samples": [{"prompt": e.prompt, "reply": r, "answer": e.answer, "ok": g}
                        for e, r, g in zip(examples, replies, ok)]}


def accuracy_row(result: dict) -> dict:
    """A metrics row's accuracy fields: heldout_acc and acc_<task>."""
    return {"heldout_acc": result["accuracy"], **{f"acc_{t}": a for t, a in result["per_task"].items()}}


def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The examples of optimizer step `step`: position g = step * batch + k of an endless stream that visits
    each of the n examples once per epoch, in an order permuted per epoch by (seed, epoch). A pure function
    of the step, so resuming needs nothing but the step."""
    out, perms = [], {}
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch = g // n
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(perms[epoch][g % n])
    return out


def save_outputs(out: Path, model: nn.Module, tok) -> None:
    """The run directory's loadable files: config.json, model.safetensors, tokenizer.json."""
    model.save(out)
    tok.save(out)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ======================================================================================================
# 2. Configuration
# ======================================================================================================


def config_field(default: Any, help: str, **kw: Any) -> Any:
    """A config dataclass field with its flag help (a list default becomes a default_factory)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


SETTINGS = "sft.json"
PARALLEL_HELP = ("layout over torchrun's processes: dp=N, zero=1|2|3, fsdp=N, tp=N, mp=bf16, e.g. fsdp=2 or dp=2,tp=2 "
                 "(empty: data parallel over all; no pp)")


@dataclass
class SFTConfig:
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
    ckpt_every: int = config_field(100, "checkpoint every N steps (and at the end)")
    keep_last: int = config_field(2, "checkpoints to keep")
    resume: bool = config_field(False, "continue the run in --out from its newest complete checkpoint")
    threads: Optional[int] = config_field(None, "CPU threads for torch")
    progress: bool = config_field(True, "print progress lines")
    parallel: str = config_field("", PARALLEL_HELP)


# ======================================================================================================
# 3. Data
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
# 4. The model: the parent's weights, the vocabulary grown by the chat tokens
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
    from glassmind.model import load

    tok = tok_lib.load(parent)
    add_chat_tokens(tok)
    model = load(parent)
    if model.config.arch != "decoder":
        raise GlassmindError(f"{parent} holds a {model.config.arch}: instruction tuning here takes a decoder")
    model = resize_vocab(model, tok.vocab_size)
    fmt = ChatFormat(tok)
    model.config.pad_token_id = fmt.pad_id
    return model, tok, fmt


# ======================================================================================================
# 5. The loop
# ======================================================================================================


def sft(cfg: SFTConfig) -> dict:
    """Run (or resume) SFT; returns the key numbers (also in card.md). Under torchrun, every rank calls it."""
    from glassmind.parallel import apply_parallel
    from glassmind.parallel.mesh import init_distributed
    from glassmind.parallel.runtime import on_rank0, rank0_copy, whole_model

    t_start = time.perf_counter()
    parent = require_dir(cfg.parent, "--from")
    for name in ("steps", "batch_size", "n_examples"):
        if getattr(cfg, name) <= 0:
            raise GlassmindError(f"--{name.replace('_', '-')} must be positive")
    spec = parallel_layout(cfg.parallel, "sft", parent=parent, batch_size=cfg.batch_size, unit="conversations")
    setup_torch(cfg.threads)
    mesh = init_distributed(spec, "cpu")  # the alignment verbs compute on the CPU: gloo; None for one process
    out = prepare_out(cfg, SETTINGS)

    model, tok, fmt = chat_model(parent)
    rows = render_all(fmt, conversations(cfg), model.config.context_length)
    heldout = task_lib.heldout_examples(cfg.eval_per_task, cfg.tasks, cfg.world_seed)
    val_rows = render_all(fmt, [e.messages() for e in heldout], model.config.context_length)
    print0(f"sft: {len(rows):,} conversations, {model.num_params():,} parameters, vocab {tok.vocab_size}"
           + (f", layout {spec}" if mesh is not None else ""))

    copy0 = rank0_copy(model)  # rank 0's one-process model for evaluation and the run's files
    pm = apply_parallel(model, spec, mesh)  # one process: the model as it is
    optimizer = pm.wrap_optimizer(adamw(pm.module, lr=cfg.lr, weight_decay=cfg.weight_decay))
    log = metrics.MetricsLog(out)
    step, extra, last = resume_state(cfg, out, model=pm, optimizer=optimizer)
    tokens_done = extra.get("tokens", 0)  # assistant (target) tokens trained on so far

    def save_checkpoint() -> Path:
        path = save_state(pm, out / "train_state", step, optimizer=optimizer, keep_last=cfg.keep_last,
                          extra={"tokens": tokens_done})
        save_run_files(out, whole_model(pm, copy0), tok)
        return path

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
        grad_norm = pm.clip_grad_norm_(cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise GlassmindError(f"step {step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; "
                                 f"stopped before the update (last checkpoint: {last}). Lower --lr and --resume")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_done += int(batch[2][:, 1:].sum())
        dt = time.perf_counter() - t0
        log.log({"step": step, "tokens": tokens_done, "loss": loss, "lr": lr,
                 "grad_norm": grad_norm, "tokens_per_s": int(batch[1].sum()) / dt})
        if cfg.progress and (step % 20 == 0 or step == cfg.steps):
            print0(f"sft step {step}/{cfg.steps}  loss {loss:.4f}  lr {lr:.2e}  {dt * 1000:.0f} ms/step")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            row = run_eval()
            print0(f"  eval: val loss {row['val_loss']:.4f}, held-out accuracy {row['heldout_acc']:.3f}")
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            last = save_checkpoint()

    final = run_eval()
    if last is None or last.name != checkpoint.step_dir_name(step):
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
              "tokens only; chat tokens " + ", ".join(fmt.tokenizer.special_tokens) + "."),
        parent=str(parent), numbers={k: v for k, v in summary.items() if k != "run"},
        config=dataclasses.asdict(cfg), plots=["loss.png"])
    print0(f"sft done: held-out accuracy {summary['heldout_acc_start']:.3f} -> {summary['heldout_acc']:.3f}, {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        from glassmind.parallel.runtime import leave_at_exit

        cfg = parse_config(SFTConfig, argv, prog="glassmind sft", settings_file=SETTINGS, renames={"parent": "--from"},
                           description="Instruction-tune a pre-trained decoder with the loss on assistant tokens.")
        with leave_at_exit():  # under torchrun: every rank leaves the process group, error or not
            sft(cfg)
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
