"""Pipeline parallelism: consecutive decoder blocks per stage, one stage per rank of the PP group, and a
schedule that streams micro-batches through them (torch.distributed.pipelining).

    stage 0      token embedding (+ positions) -> blocks [0, L/pp)
    stage s      blocks [s*L/pp, (s+1)*L/pp)
    stage pp-1   blocks ... -> final norm -> LM head -> loss

GPipe (Huang et al. 2019): all micro-batches forward, then all backward; activations of every micro-batch
are alive at the peak. 1F1B (Narayanan et al. 2021, PipeDream-Flush): after a warm-up of pp-1 forwards each
stage alternates one forward and one backward, so at most pp micro-batches are in flight per stage. Both
leave (pp-1)/(m+pp-1) of the time idle (the bubble) for m micro-batches: more micro-batches, smaller bubble.

Tied embeddings (the LM head is the token embedding, Press & Wolf 2017): the first and the last stage each
hold a copy; after backward their gradients are summed between those two ranks (Megatron-LM does the same),
so both copies take identical optimizer steps and stay equal.

Training only: no padding masks, no KV cache (inference runs the whole model on one device).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from glassmind.common import parse_dtype


class _Absent(nn.Module):
    """Stands where a block held by another stage was, so the kept blocks keep their names
    (`decoder.blocks.5` stays `decoder.blocks.5`) and checkpoints need no renaming."""

    def forward(self, x, **_):
        return x


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Split layers into n_stages consecutive runs, the first ones one longer when it does not divide."""
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append(range(start, end))
        start = end
    return bounds


class DecoderStage(nn.Module):
    """One pipeline stage of a decoder-only Transformer. `self.model` is the Transformer with the other stages'
    parts removed. Input: token ids (B, T) on the first stage, hidden states (B, T, C) elsewhere. Output:
    hidden states (B, T, C), or logits (B, T, V) on the last stage."""

    def __init__(self, model: nn.Module, stage: int, n_stages: int, *, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        cfg = model.config
        self.layers = stage_layers(cfg.n_layers, n_stages)[stage]
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.autocast_dtype = autocast_dtype
        blocks = model.decoder.blocks
        for i in range(len(blocks)):
            if i not in self.layers:
                blocks[i] = _Absent()
        if not self.is_first:
            model.decoder.position_embedding = None
            if not (self.is_last and model.lm_head is None):  # the last stage keeps the tied embedding
                model.token_embedding = None
        if not self.is_last:
            model.decoder.final_norm = None
            model.lm_head, model.lm_bias = None, None
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.is_first:
            h = m.features(x)                       # the model's own embedding code, then this stage's blocks
        else:
            from glassmind.model.transformer import rope_cos_sin

            cfg = m.config
            B, T, _ = x.shape
            rope = None
            if cfg.positional == "rope":
                positions = torch.arange(T, device=x.device).expand(B, T)
                rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
            h = x
            for i in self.layers:                   # causal, no padding: the fused kernel builds the mask
                h = m.decoder.blocks[i](h, mask=None, is_causal=True, rope=rope)
            if self.is_last and m.decoder.final_norm is not None:
                h = m.decoder.final_norm(h)
        return m.lm_logits(h) if self.is_last else h


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V) in any dtype, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1))


def build_schedule(stage_module: nn.Module, pp_mesh, *, schedule: str, n_microbatches: int,
                   device: torch.device, loss_fn):
    """This rank's PipelineStage and its GPipe or 1F1B schedule; loss_fn(logits, targets) is already scaled
    (the schedule's own scaling is off)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = PipelineStage(stage_module, pp_mesh.get_local_rank(), pp_mesh.size(), device,
                          group=pp_mesh.get_group())
    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return stage, cls(stage, n_microbatches, loss_fn=loss_fn, scale_grads=False)


def apply_pp(model: nn.Module, pp_mesh, *, mp: str = "fp32", autocast: bool = True) -> DecoderStage:
    """Cut `model` (every rank built the same one) down to this rank's stage, in place."""
    dtype = parse_dtype(mp) if mp != "fp32" and autocast else None
    return DecoderStage(model, pp_mesh.get_local_rank(), pp_mesh.size(), autocast_dtype=dtype)


def tied_pair_group(mesh, timeout):
    """The group {first stage, last stage} this rank belongs to, or None on a middle stage.

    One pair per position on the other mesh dims (dp, tp); every rank creates all of them in the same order,
    as new_group requires."""
    import torch.distributed as dist

    grid = mesh.mesh                               # global ranks, (pp, *other dims); pp is the first dim
    grid = grid.reshape(grid.shape[0], -1)
    mine = None
    for col in range(grid.shape[1]):
        ranks = [int(grid[0, col]), int(grid[-1, col])]
        group = dist.new_group(ranks, timeout=timeout)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def tied_embedding_sync(stage_module: DecoderStage, pair_group) -> None:
    """Sum the tied embedding's gradient over the first and last stage, after the schedule's backward (and
    after any data-parallel reduction, so both stages add already-averaged gradients)."""
    import torch.distributed as dist

    m = stage_module.model
    if pair_group is None or not m.config.tie_embeddings or m.token_embedding is None:
        return
    weight = m.token_embedding.weight
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    grad = weight.grad
    dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=pair_group)
