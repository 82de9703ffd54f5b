"""Sharded data parallelism: ZeRO stages 1-3 (Rajbhandari et al. 2020) with PyTorch's own engines.

Per parameter, AdamW keeps 16 bytes on every plain DDP rank: the fp32 weight (4), its gradient (4) and the
two moments m and v (8). ZeRO splits them over the N data-parallel ranks:

    stage 1  optimizer state /N             ZeroRedundancyOptimizer: each rank updates the parameters it
                                            owns, then broadcasts them; gradients still all-reduced (DDP)
    stage 2  + gradients /N                 FSDP2 with reshard_after_forward=False: gradients are
                                            reduce-scattered; parameters, sharded at rest, are gathered once
                                            per forward and stay gathered through backward
    stage 3  + parameters /N                FSDP2 (fully_shard, Zhao et al. 2023): each block's parameters
                                            are all-gathered just before its forward and again before its
                                            backward, then freed

FSDP2 keeps each parameter as a DTensor sharded on dim 0; `fully_shard` on every block then on the root
makes one communication group per block, so the gather of block i+1 overlaps the compute of block i.
Mixed precision: weights stay fp32 in the shards (the "master" copy); the gathered copy is cast to bf16/fp16
for compute, gradients are reduced in fp32 (MixedPrecisionPolicy).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from glassmind.common import parse_dtype


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks inside `model` (a whole model or a pipeline stage), in model order."""
    from glassmind.model.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def mixed_precision_policy(mp: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mp == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=parse_dtype(mp), reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, dp_mesh, *, reshard_after_forward: bool = True, mp: str = "fp32") -> nn.Module:
    """Shard `model` in place over the 1-D mesh `dp_mesh` (ZeRO-3 with reshard_after_forward=True, ZeRO-2-like
    with False). Works on a tensor-parallel model too: its DTensor parameters become 2-D (dp shard, tp shard).
    """
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(mp)
    for block in blocks_of(model):
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # The root holds what is left: embeddings, final norm, head. Its parameters are needed again right at the
    # start of backward (the tied output projection), so resharding them after forward would only re-gather.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=policy)
    return model


def fsdp_grad_sync(module: nn.Module, enabled: bool) -> None:
    """With enabled=False the next backward keeps unsharded gradients locally (no reduce-scatter)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)


def apply_zero1(optimizer: torch.optim.Optimizer, dp_group) -> torch.optim.Optimizer:
    """ZeRO-1: rebuild `optimizer` (same class, groups and settings) as a ZeroRedundancyOptimizer, so each
    data-parallel rank keeps the state of about 1/N of the parameters (whole tensors, balanced by size)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls = type(optimizer)
    accepted = set(inspect.signature(cls.__init__).parameters)
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in optimizer.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=dp_group, **defaults)
