"""Spread a model over the ranks of a layout, from outside, and give a training loop the few calls it needs.

    with distributed("dp=2,tp=2", model_config=cfg) as (spec, mesh):
        pm = apply_parallel(Transformer(cfg), spec, mesh)
        opt = pm.wrap_optimizer(adamw(pm.module, lr=...))
        for step ...:
            for micro in range(accum):                   # this rank's slice: pm.dp_rank of pm.dp_size
                loss = pm.forward_backward(x, y, loss_scale=1 / accum, sync=micro == accum - 1)
            pm.clip_grad_norm_(1.0); opt.step(); opt.zero_grad(set_to_none=True)
            print0(pm.global_loss(loss))

Order of application (torchtitan's, `parallelize.py`): pipeline split first (it removes modules), then tensor
parallel (it replaces Linear weights by DTensors), then data parallel over what is left (DDP, or FSDP2 which
shards the already tensor-parallel weights a second time).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from glassmind.common import GlassmindError, parse_dtype
from glassmind.parallel.ddp import apply_ddp, average_gradients, ddp_grad_sync
from glassmind.parallel.fsdp import apply_fsdp, apply_zero1, fsdp_grad_sync
from glassmind.parallel.mesh import (ParallelSpec, check_model, close_distributed, init_distributed, mesh_coordinate,
                                     parse_spec)
from glassmind.parallel.pipeline import (apply_pp, build_schedule, causal_lm_loss, tied_embedding_sync,
                                         tied_pair_group)
from glassmind.parallel.tensor import apply_tp, check_attention_splits


@contextlib.contextmanager
def distributed(text: str | None, *, model_config=None, device_type: str | None = None, **defaults):
    """Parse and check a layout, join the process group, build the mesh; always leave the group on exit.
    Yields (spec, mesh); mesh is None for a single process."""
    spec = parse_spec(text, **defaults)
    if model_config is not None:
        check_model(spec, model_config)
    mesh = init_distributed(spec, device_type)
    ok = False
    try:
        yield spec, mesh
        ok = True
    finally:
        close_distributed(ok=ok)


class ParallelModel:
    """A Transformer spread over the ranks of `mesh` as `spec` says.

    `module` is what this rank runs and optimizes: the (DDP- or FSDP-wrapped, tensor-parallel) model, or its
    pipeline stage. `dp_rank` / `dp_size` say which slice of the global batch this rank feeds: TP and PP ranks
    of one data-parallel replica read the same batch.
    """

    def __init__(self, model: nn.Module, spec: ParallelSpec, mesh):
        self.spec, self.mesh, self.config = spec, mesh, model.config
        self.device = next(model.parameters()).device  # the caller put the model on this rank's device
        self.dp_rank, self.dp_size = mesh_coordinate(mesh, "dp")
        self.tp_rank, self.tp_size = mesh_coordinate(mesh, "tp")
        self.pp_rank, self.pp_size = mesh_coordinate(mesh, "pp")
        self.sharded = spec.sharded
        # every rank's view of the full model, for checkpoints: names in order, as one process has them
        self.full_names = list(model.state_dict().keys())
        # DDP wraps only a plain model: it cannot hold TP's DTensor parameters, and the pipeline schedule runs
        # backward itself, around DDP's hooks. Replicas of those average their gradients by hand.
        self.manual_dp = spec.dp > 1 and spec.zero == 0 and (spec.tp > 1 or spec.pp > 1)
        self.stage = self.schedule = self.pair_group = None
        self._loss_scale = [1.0]
        self._raw_losses: list[torch.Tensor] = []
        self.autocast_dtype = None if spec.mp == "fp32" or self.sharded else parse_dtype(spec.mp)
        self._world_scaler = mesh is not None and (self.sharded or self.tp_size > 1 or self.pp_size > 1)
        self.module = self._apply(model)

    # -- building ----------------------------------------------------------------------------------------
    def _apply(self, model: nn.Module) -> nn.Module:
        spec, mesh = self.spec, self.mesh
        check_model(spec, model.config)
        if spec.tp > 1:
            check_attention_splits(model.config, spec.tp)
        if mesh is None:
            return model
        _broadcast_parameters(model)  # identical starting weights even if ranks seeded differently
        module = model
        if spec.pp > 1:
            module = apply_pp(model, mesh["pp"], mp=spec.mp, autocast=not self.sharded)
            self.pair_group = tied_pair_group(mesh, timedelta(seconds=spec.timeout))
        if spec.tp > 1:
            apply_tp(module, mesh["tp"])
        if spec.dp > 1:
            if spec.zero >= 2:
                module = apply_fsdp(module, mesh["dp"], reshard_after_forward=spec.zero == 3, mp=spec.mp)
            elif not self.manual_dp:
                module = apply_ddp(module, mesh["dp"])
        if spec.pp > 1:
            self.stage, self.schedule = self._schedule(module)
        return module

    def _schedule(self, module):
        n_micro = self.spec.n_microbatches

        def loss_fn(logits, targets):
            # The schedule's own 1/n_micro scaling is off (it would also rescale gradients accumulated by
            # earlier calls): each micro-batch's loss is scaled here instead.
            raw = causal_lm_loss(logits, targets)
            self._raw_losses.append(raw.detach())
            return raw * (self._loss_scale[0] / n_micro)

        return build_schedule(module, self.mesh["pp"], schedule=self.spec.schedule, n_microbatches=n_micro,
                              device=self.device, loss_fn=loss_fn)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Call it on a new optimizer, before its first step. ZeRO-1 replaces it by a ZeroRedundancyOptimizer.
        Other layouts keep it, rebuilt without the fused AdamW kernel where torch 2.13 cannot run that: a group
        mixing DTensor weights (TP's split Linears) with plain ones (embeddings, norms), and fp16 with
        ShardedGradScaler (its found-inf flag has shape (1,), the kernel wants ())."""
        if self.spec.zero == 1 and self.dp_size > 1:
            return apply_zero1(optimizer, self.mesh["dp"].get_group())
        from torch.distributed.tensor import DTensor

        sharded_scaler = self.spec.mp == "fp16" and self._world_scaler
        mixed = any(len({isinstance(p, DTensor) for p in g["params"]}) > 1 for g in optimizer.param_groups)
        if optimizer.defaults.get("fused") and (mixed or sharded_scaler):
            return rebuilt(optimizer, fused=None)
        return optimizer

    # -- names -------------------------------------------------------------------------------------------
    def _canonical(self, name: str) -> str:
        """This rank's parameter name -> the single-process model's name (drop DDP's and the stage's prefix)."""
        for prefix in ("module.", "_orig_mod.") + (("model.",) if self.spec.pp > 1 else ()):
            if name.startswith(prefix):
                name = name[len(prefix):]
        return name

    def named_parameters(self):
        """(single-process name, parameter) for every parameter this rank holds."""
        for name, p in self.module.named_parameters():
            yield self._canonical(name), p

    def is_tied_copy(self, name: str) -> bool:
        """The last pipeline stage's copy of the tied embedding (the first stage's is the original)."""
        return (self.pp_size > 1 and self.pp_rank == self.pp_size - 1 and name == "token_embedding.weight")

    # -- one micro-batch ---------------------------------------------------------------------------------
    def forward_backward(self, ids: torch.Tensor, targets: torch.Tensor, *, loss_scale: float = 1.0,
                         sync: bool = True, scaler=None) -> torch.Tensor:
        """Forward and backward of one micro-batch of this rank: ids, targets (B, T). Gradients of
        `loss * loss_scale` are added to `.grad` (pass 1/accum when accumulating), times the fp16 loss scale
        of `scaler` (from grad_scaler) when one is given: unscale_ it before clipping. With sync=False the
        data-parallel gradient reduction is skipped (all but the last micro-batch of an optimizer step).

        Returns this rank's mean loss (detached); `global_loss` averages it over the data-parallel ranks.
        Under PP the batch is split into `microbatches` inside; only the last stage has a loss (0 elsewhere).
        """
        ids, targets = ids.to(self.device), targets.to(self.device)
        if self.schedule is not None:
            return self._pipeline_step(ids, targets, loss_scale=loss_scale, sync=sync, scaler=scaler)
        with self.grad_sync(sync), self.autocast():
            loss = causal_lm_loss(self.module(ids), targets)
            scaled = loss * loss_scale
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss.detach()

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool):
        """Put the forward and backward of one micro-batch inside it (a loop with its own loss does this
        instead of calling forward_backward). enabled=False: skip the data-parallel gradient reduction, for
        all but the last micro-batch of an optimizer step. Not for pipelines (their schedule runs backward)."""
        if self.schedule is not None:
            raise GlassmindError("under pp the schedule runs forward and backward: call forward_backward")
        if self.sharded:
            fsdp_grad_sync(self.module, enabled)
        with ddp_grad_sync(self.module, enabled):
            yield
        if enabled and self.manual_dp:
            average_gradients(self.module, self.mesh["dp"].get_group())

    def _pipeline_step(self, ids, targets, *, loss_scale: float, sync: bool, scaler=None) -> torch.Tensor:
        if ids.shape[0] % self.spec.n_microbatches:
            raise GlassmindError(f"--parallel {self.spec}: the batch of {ids.shape[0]} rows per replica does not "
                                 f"split into {self.spec.n_microbatches} microbatches; make it a multiple")
        if scaler is not None and scaler.is_enabled():
            # fp16: the schedule calls loss_fn itself, so the scaler's factor goes into loss_fn's scale. Every
            # stage asks the scaler (not only the last, which has the loss): that starts its scale, which
            # unscale_ needs, and the found-inf all-reduce then runs on all ranks.
            loss_scale = loss_scale * float(scaler.scale(torch.ones((), device=self.device)))
        self._loss_scale[0] = loss_scale
        self._raw_losses.clear()
        if self.stage.is_first:
            self.schedule.step(ids)
        elif self.stage.is_last:
            self.schedule.step(target=targets)
        else:
            self.schedule.step()
        if sync:
            if self.manual_dp:
                average_gradients(self.module, self.mesh["dp"].get_group())
            tied_embedding_sync(self._stage_module(), self.pair_group)
        return self._stage_loss()

    def _stage_loss(self) -> torch.Tensor:
        """Mean of this step's micro-batch losses on the last stage, 0 elsewhere. The first step of a schedule
        also runs a shape-inference forward through loss_fn: only the last n_microbatches losses are real."""
        real = self._raw_losses[-self.spec.n_microbatches:]
        return torch.stack(real).mean() if real else torch.zeros((), device=self.device)

    def _stage_module(self):
        m = self.module
        return getattr(m, "module", m)  # DDP keeps the stage in .module; FSDP2 is the stage itself

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of one batch without gradients (validation); same conventions as forward_backward."""
        ids, targets = ids.to(self.device), targets.to(self.device)
        if self.schedule is None:
            with self.autocast():
                return causal_lm_loss(self.module(ids), targets)
        self._raw_losses.clear()
        if self.stage.is_first:
            self.schedule.eval(ids)
        elif self.stage.is_last:
            self.schedule.eval(target=targets)
        else:
            self.schedule.eval()
        return self._stage_loss()

    def grad_scaler(self, enabled: bool = True):
        """The loss scaler fp16 needs. When each rank holds only part of the gradients (FSDP and TP shards,
        pipeline stages) an inf on one rank must skip the step on all: this scaler all-reduces its found-inf
        flag over every rank. DDP replicas hold the same gradients, so a plain GradScaler does there."""
        if self._world_scaler:
            return world_grad_scaler(self.device.type, enabled=enabled)
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def autocast(self):
        """The compute-dtype context of `mp=` for a loop that runs pm.module itself (under FSDP the
        MixedPrecisionPolicy casts instead, and this is a no-op)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


    def global_loss(self, loss: torch.Tensor) -> float:
        """The mean loss over the global batch, the same number on every rank (one all-reduce).

        Each data-parallel replica's loss is counted once: TP ranks hold copies, and under PP only the last
        stage has it, so each rank contributes loss / (dp * tp) if it is a last stage, else 0."""
        if self.mesh is None:
            return float(loss)
        last = self.pp_rank == self.pp_size - 1
        share = loss.detach().float().reshape(()) * (1.0 / (self.dp_size * self.tp_size) if last else 0.0)
        dist.all_reduce(share)
        return float(share)

    def global_sum(self, values) -> torch.Tensor:
        """Per-replica numbers (a scalar or a vector, e.g. a loss sum and its count) summed over the
        data-parallel replicas, the same on every rank, in float64 (one all-reduce). Counting follows
        global_loss: tensor-parallel copies count once, only a pipeline's last stage counts."""
        values = torch.as_tensor(values).detach().to(self.device, torch.float64).clone()
        if self.mesh is None:
            return values.cpu()
        last = self.pp_rank == self.pp_size - 1
        values *= (1.0 / self.tp_size) if last else 0.0
        dist.all_reduce(values)
        return values.cpu()

    # -- files: the train state and the model, in the one-process format whatever the layout ---------------
    def save_state(self, root, step: int, *, optimizer, scaler=None, loader_state: dict | None = None,
                   extra: dict | None = None, keep_last: int = 3):
        """glassmind.train.checkpoint.save for this layout: every rank gathers its pieces, rank 0 writes."""
        from glassmind.parallel import gather

        return gather.save_checkpoint(self, root, step, optimizer=optimizer, scaler=scaler,
                                      loader_state=loader_state, extra=extra, keep_last=keep_last)

    def load_state(self, path, *, optimizer=None, scaler=None) -> dict:
        """glassmind.train.checkpoint.load for this layout (any layout may have written the checkpoint)."""
        from glassmind.parallel import gather

        return gather.load_checkpoint(self, path, optimizer=optimizer, scaler=scaler)

    def save_model(self, run_dir):
        """config.json + model.safetensors of the whole model (every rank calls it; rank 0 writes)."""
        from glassmind.parallel import gather

        return gather.save_model(self, run_dir)

    # -- after backward ----------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before clipping.

        The norm is over the whole model, whatever the layout: sharded pieces (DTensors, FSDP and TP) are
        summed over their ranks, replicated ones counted once, pipeline stages added up, the tied embedding's
        second copy left out."""
        from torch.distributed.tensor import DTensor
        from torch.nn.utils import get_total_norm

        dtensors, plain, every = [], [], []
        for name, p in self.named_parameters():
            if p.grad is None:
                continue
            every.append(p)
            if self.is_tied_copy(name):
                continue
            (dtensors if isinstance(p.grad, DTensor) else plain).append(p.grad)
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        by_mesh: dict = {}  # FSDP x TP: the TP-split weights live on the 2-D mesh, the rest on the dp mesh
        for g in dtensors:
            by_mesh.setdefault(g.device_mesh, []).append(g)
        for grads in by_mesh.values():
            sq += get_total_norm(grads).full_tensor().float() ** 2
        if plain:
            sq += get_total_norm(plain).float() ** 2
        if self.pp_size > 1:
            dist.all_reduce(sq, group=self.mesh["pp"].get_group())
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s formula
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in every]
        if local:
            torch._foreach_mul_(local, coef.to(local[0].device))
        return float(norm)


def world_grad_scaler(device_type: str, *, enabled: bool = True):
    """A ShardedGradScaler (found-inf all-reduced over the default group, i.e. every rank) that also takes an
    optimizer whose gradients mix DTensors (TP's split Linears) and plain tensors (embeddings, norms): torch
    2.13's own unscale puts both in one foreach call, which DTensor refuses. Each rank unscales and checks its
    local pieces; the all-reduce in unscale_ then gives every rank the same verdict."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    from torch.distributed.tensor import DTensor

    class LocalPiecesGradScaler(ShardedGradScaler):
        def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16=True):
            by_kind: dict = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                        by_kind.setdefault((g.device, g.dtype), []).append(g)
            found = {}  # device -> found-inf flag (1,), what GradScaler.step and update read
            with torch.no_grad():
                for (device, _), grads in by_kind.items():
                    flag = found.setdefault(device, found_inf.to(device))
                    torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, inv_scale.to(device))
            return found or {found_inf.device: found_inf}  # a rank without gradients still joins the reduce

    return LocalPiecesGradScaler(device_type, enabled=enabled)


def rebuilt(optimizer: torch.optim.Optimizer, **changes) -> torch.optim.Optimizer:
    """A new optimizer of the same class over the same groups, with `changes` to its settings (before any
    step: there is no state to carry)."""
    import inspect

    accepted = set(inspect.signature(type(optimizer).__init__).parameters)
    defaults = {k: v for k, v in {**optimizer.defaults, **changes}.items() if k in accepted}
    groups = [{**g, **{k: v for k, v in changes.items() if k in g}} for g in optimizer.param_groups]
    return type(optimizer)(groups, **defaults)


def _broadcast_parameters(model: nn.Module) -> None:
    """Rank 0's weights to every rank: shards and replicas must start from one model (costs one broadcast of
    the model at start)."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def single_process(model: nn.Module, mp: str = "fp32") -> ParallelModel:
    """`model` as one process trains it, with the same calls a layout has (the RL recipes: they roll out
    through the inference engine on the whole model, so they run in one process); `mp`: the compute dtype
    that `autocast()` applies (fp32: none)."""
    return ParallelModel(model, parse_spec("", world_size=1, mp=mp), None)


def apply_parallel(model: nn.Module, spec: ParallelSpec, mesh) -> ParallelModel:
    """Spread `model` (built on every rank and already on this rank's device) over `mesh` as `spec` says.
    mesh None (one process): the model as it is, with the same calls."""
    return ParallelModel(model, spec, mesh)

