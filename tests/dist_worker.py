"""What each rank runs for tests/test_parallel.py (launched by glassmind.parallel.launch.torchrun).

    python tests/dist_worker.py suite OUT LAYOUT [LAYOUT ...]   train, checkpoint, resume under each layout
    python tests/dist_worker.py errors OUT                      wrong layouts, then a collective that times out
    python tests/dist_worker.py sleep OUT                       hang (the launcher must kill it)

One process group serves every layout of a `suite` launch (torchrun costs seconds per start); each layout
gets its own mesh. Rank 0 writes OUT/<layout>/result.json; every rank writes OUT/<layout>/memory_<rank>.json.
The single-process reference (`reference_run`) is the same code with no layout, run by the test itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from glassmind.model import ModelConfig, Transformer
from glassmind.parallel import gather as pckpt
from glassmind.parallel.apply import apply_parallel
from glassmind.parallel.mesh import build_mesh, check_model, init_process_group, parse_spec
from glassmind.parallel.pipeline import causal_lm_loss
from glassmind.train.optim import adamw

STEPS, ACCUM, GLOBAL_BATCH, SEQ = 3, 2, 8, 16
SAVE_AT = 2
LR, MAX_NORM = 1e-2, 0.5
TIMEOUT_S = 60


def tiny_config(**kw) -> ModelConfig:
    # GQA (4 query heads, 2 kv heads), rope, SwiGLU (gate), biases, tied embeddings: every path TP/PP split
    base = dict(vocab_size=96, context_length=SEQ, d_model=32, n_heads=4, n_kv_heads=2, n_layers=4,
                positional="rope", activation="swiglu", dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def make_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**kw))


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 96, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def micro_slices(batch: torch.Tensor, dp_rank: int, dp_size: int):
    """The global batch -> ACCUM micro-batches -> this data-parallel rank's rows of each: (x, y) pairs."""
    for micro in batch.chunk(ACCUM):
        rows = micro.chunk(dp_size)[dp_rank]
        yield rows[:, :-1], rows[:, 1:]


# ----------------------------------------------------------------------------------------------------
# the single-process reference


def reference_run(steps: int = STEPS, *, model=None, optimizer=None, start: int = 0, mp: str = "fp32",
                  record: dict | None = None) -> tuple[list[float], Transformer]:
    """One process. mp="bf16": bf16 autocast, the reference of the bf16 layouts. `record` (a dict) receives
    "grads" (every parameter's gradient after the first step's backward, before clipping) and "grad_norms"."""
    model = model if model is not None else make_model()
    opt = optimizer if optimizer is not None else adamw(model, lr=LR)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mp == "bf16" else contextlib.nullcontext
    losses = []
    for batch in batches(steps)[start:]:
        total = 0.0
        for x, y in micro_slices(batch, 0, 1):
            with ctx():
                loss = causal_lm_loss(model(x), y)
            (loss / ACCUM).backward()
            total += float(loss.detach()) / ACCUM
        if record is not None and "grads" not in record:
            record["grads"] = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                               if p.grad is not None}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        if record is not None:
            record.setdefault("grad_norms", []).append(float(norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, model


# ----------------------------------------------------------------------------------------------------
# one layout


def full_grads(pm) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as one process would hold it (single-process names, full shapes, fp32, CPU)
    on global rank 0, {} elsewhere; every rank must call it. Sharded gradients (FSDP, TP: DTensors) are
    gathered, data/tensor-parallel copy 0 is kept, pipeline stages are gathered to rank 0 (the tied
    embedding: the first stage's copy, which after the tied-embedding sync holds both stages' sum)."""
    from torch.distributed.tensor import DTensor

    local = {}
    for name, p in pm.module.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        if pckpt._holds_replica_zero(pm):
            local[pm._canonical(name)] = g.detach().float().cpu().clone()
    stages = pckpt._gather_stages(pm, local)
    merged: dict[str, torch.Tensor] = {}
    for part in stages or []:
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged


def train_steps(pm, opt, data, scaler=None, record: dict | None = None) -> list[float]:
    """Steps of the parallel model; with a (fp16) scaler, the path a loop with its own loss takes: grad_sync
    around forward and scaled backward, unscale before clipping. `record` as in reference_run (the gradients
    are gathered after the data-parallel reduction and the fp16 unscale, i.e. what clipping sees)."""
    losses = []
    for batch in data:
        total = 0.0
        for i, (x, y) in enumerate(micro_slices(batch, pm.dp_rank, pm.dp_size)):
            if scaler is None:
                loss = pm.forward_backward(x, y, loss_scale=1 / ACCUM, sync=i == ACCUM - 1)
            else:
                with pm.grad_sync(i == ACCUM - 1), pm.autocast():
                    loss = causal_lm_loss(pm.module(x), y)
                    scaler.scale(loss / ACCUM).backward()
            total += pm.global_loss(loss) / ACCUM
        if scaler is not None:
            scaler.unscale_(opt)
        if record is not None and "grads" not in record:
            record["grads"] = full_grads(pm)
        norm = pm.clip_grad_norm_(MAX_NORM)
        if record is not None:
            record.setdefault("grad_norms", []).append(float(norm))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def local_numel(pm) -> int:
    return sum(_local(p).numel() for _, p in pm.named_parameters())


def optimizer_bytes(opt) -> int:
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps its shard's optimizer in .optim
    return sum(_local(v).numel() * v.element_size() for s in inner.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


FROZEN = "frozen:"  # a layout run with lr 0: the test shows its checks reject a model that never trains


def folder_name(layout: str) -> str:
    return layout.replace(",", "_").replace("=", "").replace(":", "_")


def run_layout(text: str, out: Path) -> None:
    lr = 0.0 if text.startswith(FROZEN) else LR
    spec = parse_spec(text.removeprefix(FROZEN), timeout=TIMEOUT_S)
    mesh = build_mesh(spec)
    rank = dist.get_rank()
    folder = out / folder_name(text)
    folder.mkdir(parents=True, exist_ok=True)
    data = batches()

    fp16 = spec.mp == "fp16"
    pm = apply_parallel(make_model(), spec, mesh)
    opt = pm.wrap_optimizer(adamw(pm.module, lr=lr))
    scaler = pm.grad_scaler() if fp16 else None
    record: dict = {}
    losses = train_steps(pm, opt, data[:SAVE_AT], scaler, record)
    memory = {"params": local_numel(pm), "optimizer_bytes": optimizer_bytes(opt)}
    pckpt.save_checkpoint(pm, folder / "train_state", SAVE_AT, optimizer=opt, scaler=scaler)
    losses += train_steps(pm, opt, data[SAVE_AT:], scaler, record)
    x, y = data[0][:, :-1].chunk(pm.dp_size)[pm.dp_rank], data[0][:, 1:].chunk(pm.dp_size)[pm.dp_rank]
    eval_loss = pm.global_loss(pm.eval_loss(x, y))
    pckpt.save_model(pm, folder / "model")
    if lr == 0.0:  # the frozen run only feeds the checks' self-test: no resume
        if rank == 0:
            (folder / "result.json").write_text(json.dumps({"layout": str(spec), "losses": losses,
                                                            "eval_loss": eval_loss,
                                                            "grad_norms": record["grad_norms"]}))
            torch.save(record["grads"], folder / "grads_first_step.pt")
        dist.barrier()
        return

    # resume: a differently initialised model takes the step-2 state and must repeat step 3 exactly
    pm2 = apply_parallel(make_model(seed=99), spec, mesh)
    opt2 = pm2.wrap_optimizer(adamw(pm2.module, lr=LR))
    scaler2 = pm2.grad_scaler() if fp16 else None
    info = pckpt.load_checkpoint(pm2, folder / "train_state" / f"step_{SAVE_AT:08d}", optimizer=opt2,
                                 scaler=scaler2)
    resumed = train_steps(pm2, opt2, data[info["step"]:], scaler2)
    # ... and the state a single process saved (another layout wrote it: the files are layout-free)
    single = os.environ.get("GM_SINGLE_CKPT")
    from_single = None
    if single:
        pm3 = apply_parallel(make_model(seed=7), spec, mesh)
        opt3 = pm3.wrap_optimizer(adamw(pm3.module, lr=LR))
        scaler3 = pm3.grad_scaler() if fp16 else None
        info3 = pckpt.load_checkpoint(pm3, single, optimizer=opt3)
        from_single = train_steps(pm3, opt3, data[info3["step"]:], scaler3)

    (folder / f"memory_{rank}.json").write_text(json.dumps(memory))
    if rank == 0:
        result = {"layout": str(spec), "losses": losses, "resumed": resumed, "eval_loss": eval_loss,
                  "resumed_from": info["step"], "from_single": from_single, "grad_norms": record["grad_norms"]}
        torch.save(record["grads"], folder / "grads_first_step.pt")
        (folder / "result.json").write_text(json.dumps(result))
    del pm, pm2, opt, opt2
    dist.barrier()


# ----------------------------------------------------------------------------------------------------
# wrong layouts and a dead peer


WRONG = {  # layout -> model config changes
    "tp=2": dict(n_heads=3, d_model=24, n_kv_heads=None),  # 3 heads do not split over 2 ranks
    "pp=2": dict(n_layers=1),                               # 2 stages, 1 layer
    "dp=3": {},                                             # 3 != 2 processes
}


def run_errors(out: Path) -> None:
    from glassmind.common import GlassmindError

    rank = int(os.environ["RANK"])
    messages = {}
    for text, changes in WRONG.items():
        try:  # no process group exists yet: an error here cannot be a hang
            spec = parse_spec(text, timeout=TIMEOUT_S)
            check_model(spec, tiny_config(**changes))
            messages[text] = None
        except GlassmindError as e:
            messages[text] = str(e)
    (out / f"errors_{rank}.json").write_text(json.dumps(messages))

    # a peer that stops answering: the mesh's sub-group times out instead of waiting forever
    spec = parse_spec("dp=2", timeout=3)
    init_process_group(spec.timeout)
    mesh = build_mesh(spec)
    if rank == 1:
        time.sleep(60)
        return
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(1), group=mesh["dp"].get_group())
        outcome = "completed"
    except Exception as e:  # gloo raises on timeout
        outcome = f"{type(e).__name__}: {str(e)[:200]}"
    (out / "timeout.json").write_text(json.dumps({"outcome": outcome, "seconds": time.time() - t0}))
    os._exit(3)  # the peer is asleep: leave without the teardown barrier; torchrun stops the rest


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "sleep":
        (out / f"sleeping_{os.environ.get('RANK', 0)}").write_text(str(os.getpid()))
        time.sleep(3600)
        return 0
    if mode == "errors":
        run_errors(out)
        return 0
    torch.set_num_threads(1)
    init_process_group(TIMEOUT_S)
    try:
        for text in argv[2:]:
            try:
                run_layout(text, out)
            except Exception:  # record it and go on: one broken layout must not hide the others
                folder = out / folder_name(text)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"error_{dist.get_rank()}.txt").write_text(traceback.format_exc())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
