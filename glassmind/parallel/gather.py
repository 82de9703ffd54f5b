"""Checkpoints under any layout (`ParallelModel.save_state` / `load_state` / `save_model` call these): gather to rank 0, written in the single-process format.

Choice: gather-to-rank-0, not torch.distributed.checkpoint's sharded files. Every piece of the model and of
the optimizer state (FSDP shards, TP slices, ZeRO-1 partitions, pipeline stages) is gathered into full
tensors with single-process names, and rank 0 writes them with `glassmind.train.checkpoint` (safetensors,
atomic, manifest last). So a checkpoint is the same files whatever the layout that wrote it: it resumes
under another layout (fsdp=2 -> tp=2, or one process) and `glassmind.model.load` reads a model saved by
`save_model` with no conversion. The price is that rank 0 holds one full copy in CPU memory while writing,
and gathering moves the whole state over the network: fine up to a few billion parameters; past that a
sharded format (DCP) is the right tool.

Loading: every rank reads the same files (a filesystem all nodes see) and keeps its own piece. The optimizer
state is stored by parameter index, as torch does, with each group's parameter names (`param_names`) beside
it so a different layout can find each parameter's state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from glassmind.common import GlassmindError

if TYPE_CHECKING:  # annotations only: apply.py calls into this file
    from glassmind.parallel.apply import ParallelModel


# ----------------------------------------------------------------------------------------------------
# one tensor: local piece <-> full


def _full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of which `t` is this rank's piece (a collective when it is sharded)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full`, shaped and placed like `like` (no communication: every rank has `full`)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


def _holds_replica_zero(pm: ParallelModel) -> bool:
    """Data-parallel and tensor-parallel copy 0: the ranks whose gathered state is kept."""
    return pm.dp_rank == 0 and pm.tp_rank == 0


def _gather_stages(pm: ParallelModel, obj):
    """Under PP, collect each stage's object on global rank 0 (list in stage order); else [obj]."""
    if pm.pp_size == 1:
        return [obj] if dist_rank() == 0 else None
    if not _holds_replica_zero(pm):  # whole PP groups take part together or not at all
        return None
    group = pm.mesh["pp"].get_group()
    dst = dist.get_global_rank(group, 0)
    out = [None] * pm.pp_size if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


# ----------------------------------------------------------------------------------------------------
# model


def full_model_state(pm: ParallelModel) -> dict[str, torch.Tensor]:
    """The whole model's state_dict with single-process names, on CPU, on global rank 0 ({} elsewhere).
    Every rank must call it."""
    local = {}
    for name, t in pm.module.state_dict().items():
        cname = pm._canonical(name)
        full = _full(t).detach()
        if _holds_replica_zero(pm):
            local[cname] = full.cpu()
    stages = _gather_stages(pm, local)
    if stages is None:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for part in stages:
        for k, v in part.items():
            merged.setdefault(k, v)  # the tied embedding: the first stage's copy
    return {k: merged[k] for k in pm.full_names if k in merged}


def load_full_model_state(pm: ParallelModel, state: dict[str, torch.Tensor]) -> None:
    """Load a full single-process state_dict (every rank passes the same one) into this rank's piece."""
    local = {}
    for name, t in pm.module.state_dict().items():
        cname = pm._canonical(name)
        if cname not in state:
            raise GlassmindError(f"the checkpoint has no {cname!r}: it was saved from another model config")
        if tuple(state[cname].shape) != tuple(t.shape):  # a DTensor's shape is the full one
            raise GlassmindError(f"{cname}: checkpoint shape {tuple(state[cname].shape)} vs model "
                                 f"{tuple(t.shape)}; resume with the run's model config")
        local[name] = _local(state[cname], t)
    pm.module.load_state_dict(local, strict=True)


# ----------------------------------------------------------------------------------------------------
# optimizer


def _is_zero1(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _group_names(pm: ParallelModel, optimizer) -> list[list[str]]:
    """Single-process names of the parameters of each optimizer group, in the optimizer's order."""
    names = {id(p): n for n, p in pm.named_parameters()}
    try:
        return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    except KeyError:
        raise GlassmindError("the optimizer holds a parameter the model does not: build it from pm.module "
                             "after apply_parallel") from None


def full_optimizer_state(pm: ParallelModel, optimizer) -> dict | None:
    """The optimizer's state_dict as one process would have it (indices into the full model's groups, plus
    `param_names` per group), on global rank 0; None elsewhere. Every rank must call it."""
    names = _group_names(pm, optimizer)
    flat = [n for group in names for n in group]
    if _is_zero1(optimizer):
        # ZeRO-1: each rank owns whole tensors; collect them on data-parallel rank 0 first
        group = pm.mesh["dp"].get_group()
        optimizer.consolidate_state_dict(to=dist.get_global_rank(group, 0))
        sd = optimizer.state_dict() if pm.dp_rank == 0 else None
    else:
        sd = optimizer.state_dict()
    part = None
    if sd is not None:
        state = {}
        for idx in sorted(sd["state"]):  # same order on every rank of a collective
            name = flat[idx]
            state[name] = {k: (_full(v).detach().cpu() if isinstance(v, torch.Tensor) and v.dim() > 0
                               else (v.detach().cpu() if isinstance(v, torch.Tensor) else v))
                           for k, v in sd["state"][idx].items()}
        hyper = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in sd["param_groups"]]
        part = {"state": state if _holds_replica_zero(pm) else {}, "groups": hyper, "names": names}
    if pm.pp_size == 1:
        return _indexed([part]) if part is not None and dist_rank() == 0 else None
    stages = _gather_stages(pm, part)
    return _indexed(stages) if stages is not None else None


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _indexed(parts: list[dict]) -> dict:
    """Stages' {name: state} and group names -> torch's format: groups concatenated in stage order (which is
    model order, stages holding consecutive layers), each name once."""
    groups, seen, state = [], set(), {}
    for g, hyper in enumerate(parts[0]["groups"]):
        names = []
        for part in parts:
            for n in part["names"][g]:
                if n not in seen:
                    seen.add(n)
                    names.append(n)
        groups.append((hyper, names))
    for part in parts:
        for n, s in part["state"].items():
            state.setdefault(n, s)
    index, out_groups = {}, []
    for hyper, names in groups:
        for n in names:
            index[n] = len(index)
        out_groups.append({**hyper, "params": [index[n] for n in names], "param_names": names})
    return {"state": {index[n]: s for n, s in state.items()}, "param_groups": out_groups}


RUNTIME_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_full_optimizer_state(pm: ParallelModel, optimizer, full: dict) -> None:
    """Load a full optimizer state_dict (every rank passes the same one) into this rank's optimizer."""
    names = _group_names(pm, optimizer)
    flat = [n for group in names for n in group]
    saved = full["param_groups"]
    if len(saved) != len(names):
        raise GlassmindError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this one "
                             f"{len(names)}: resume with the same optimizer settings")
    if all("param_names" in g for g in saved):
        where = {n: i for g in saved for n, i in zip(g["param_names"], g["params"])}
    elif pm.pp_size == 1:  # written by one process without names: the same order as ours
        where = {n: i for n, i in zip(flat, (i for g in saved for i in g["params"]))}
    else:  # ... but a stage holds only some parameters: rebuild the one-process order
        where = _builder_order(pm, saved)
    params = {n: p for n, p in pm.named_parameters()}
    state = {}
    for idx, name in enumerate(flat):
        if name not in where:
            raise GlassmindError(f"the checkpoint's optimizer has no state for {name!r}")
        saved_state = full["state"].get(where[name])
        if saved_state is None:
            continue  # never stepped
        like = params[name]
        state[idx] = {k: (_local(v, like) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                      for k, v in saved_state.items()}
    groups = []
    start = 0
    for g, group_names, current in zip(saved, names, optimizer.param_groups):
        hyper = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        # how the update runs (fused kernel or not) belongs to this process and layout, not to the checkpoint
        hyper.update({k: current[k] for k in RUNTIME_KEYS if k in current})
        groups.append({**hyper, "params": list(range(start, start + len(group_names)))})
        start += len(group_names)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _builder_order(pm: ParallelModel, saved: list[dict]) -> dict[str, int]:
    """Parameter name -> index in a one-process optimizer built by glassmind.train.optim.param_groups (the
    order it stores state in), for checkpoints whose optimizer state carries no names."""
    from glassmind.model import Transformer
    from glassmind.train.optim import param_groups

    with torch.device("meta"):
        model = Transformer(pm.config)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
    if [len(g) for g in groups] != [len(g["params"]) for g in saved]:
        raise GlassmindError("this checkpoint's optimizer state has no parameter names and was not built by "
                             "glassmind.train.optim; resume it once without pp, save, then resume under pp")
    return {n: i for g_names, g in zip(groups, saved) for n, i in zip(g_names, g["params"])}


# ----------------------------------------------------------------------------------------------------
# training state and model files


class _Frozen:
    """Hands glassmind.train.checkpoint a ready state_dict, or takes the one it reads."""

    def __init__(self, state=None, expected: list[str] | None = None):
        self.state, self.expected = state, expected

    def state_dict(self):
        return self.state

    def load_state_dict(self, state, strict: bool = True):
        if self.expected is not None:
            missing = sorted(set(self.expected) - set(state))
            unexpected = sorted(set(state) - set(self.expected))
            if missing or unexpected:
                raise RuntimeError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.state = state


def save_checkpoint(pm: ParallelModel, root: str | os.PathLike, step: int, *, optimizer, scaler=None,
                    loader_state: dict | None = None, extra: dict | None = None, keep_last: int = 3) -> Path:
    """glassmind.train.checkpoint.save for a model under any layout. Every rank calls it; rank 0 writes;
    all return the checkpoint folder once it is complete."""
    from glassmind.train import checkpoint as ckpt  # below parallel in the house: imported on use

    model_state = full_model_state(pm)
    opt_state = full_optimizer_state(pm, optimizer)
    final = Path(root) / ckpt.step_dir_name(step)
    if dist_rank() == 0:
        ckpt.save(root, step, model=_Frozen(model_state), optimizer=_Frozen(opt_state), scaler=scaler,
                  loader_state=loader_state, extra=extra, keep_last=keep_last)
    if dist.is_initialized():
        dist.barrier()  # nobody reads or prunes the folder before rank 0 has renamed it into place
    return final


def load_checkpoint(pm: ParallelModel, path: str | os.PathLike, *, optimizer=None, scaler=None,
                    restore_rng: bool = True) -> dict:
    """glassmind.train.checkpoint.load for a model under any layout (any layout may have written it).
    Every rank reads the files and keeps its piece. Returns {"step", "loader", "extra"}.

    RNG: every rank gets rank 0's saved generator states (exact for dropout-free training)."""
    from glassmind.train import checkpoint as ckpt

    model_in = _Frozen(expected=pm.full_names)
    opt_in = _Frozen() if optimizer is not None else None
    info = ckpt.load(path, model=model_in, optimizer=opt_in, scaler=scaler, restore_rng=restore_rng)
    load_full_model_state(pm, model_in.state)
    if optimizer is not None:
        load_full_optimizer_state(pm, optimizer, opt_in.state)
    return info


class _ModelFiles:
    def __init__(self, config, state):
        self.config, self.state = config, state

    def state_dict(self):
        return self.state


def save_model(pm: ParallelModel, run_dir: str | os.PathLike) -> Path:
    """`config.json` + `model.safetensors` of the whole model, as `glassmind.model.save_model` writes them, so
    `glassmind.model.load_model(run_dir)` runs it in one process. Every rank calls it; rank 0 writes."""
    from glassmind.model.files import save_model as save_files

    state = full_model_state(pm)
    if dist_rank() == 0:
        save_files(_ModelFiles(pm.config, state), run_dir)
    if dist.is_initialized():
        dist.barrier()
    return Path(run_dir)
