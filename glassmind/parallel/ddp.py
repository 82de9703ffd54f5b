"""Data parallelism (DDP): every rank holds the whole model and a slice of the batch; gradients are averaged
with an all-reduce during backward, overlapped with it bucket by bucket (Li et al. 2020, "PyTorch
Distributed", sec. 3.2).

Gradient accumulation: the all-reduce is needed once per optimizer step, not once per micro-batch. Inside
`no_sync()` DDP only accumulates into `.grad`; the last micro-batch runs outside it and averages the sum.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, dp_mesh) -> DistributedDataParallel:
    """Wrap `model` (already on its device) in DDP over the 1-D mesh `dp_mesh`.

    gradient_as_bucket_view: `.grad` tensors are views into DDP's communication buckets instead of separate
    copies, which saves one model-sized buffer. The model's only buffers (the sinusoid table) are the same
    function of the config on every rank: no need to broadcast them before each forward.

    Only for a plain model. DDP cannot hold DTensor parameters (its DDP + TP workaround swaps in new Parameter
    objects at every forward, so an optimizer built before then updates stale ones), and under a pipeline
    schedule its reducer fails; tensor-parallel and pipelined replicas use `average_gradients` below.
    """
    return DistributedDataParallel(model, device_mesh=dp_mesh, gradient_as_bucket_view=True,
                                   forward_sync_buffers=False)


def ddp_grad_sync(module: nn.Module, enabled: bool):
    """A context: with enabled=False, backward accumulates locally and skips the all-reduce."""
    if enabled or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def average_gradients(module: nn.Module, dp_group, *, bucket_bytes: int = 25 * 2**20) -> None:
    """Replicated data parallelism by hand, for models DDP cannot wrap (tensor-parallel ones): after the last
    backward of a step, average every gradient over `dp_group`.

    Gradients are packed into buckets of about 25 MB (DDP's default size) so each all-reduce moves one big
    buffer instead of many small ones. Unlike DDP nothing overlaps with backward: the all-reduces start once
    backward is done.
    """
    import torch
    import torch.distributed as dist

    size = dist.get_world_size(dp_group)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # a DTensor's local shard
    by_dtype: dict = {}
    for t in local:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for tensors in by_dtype.values():
        bucket, nbytes = [], 0
        for t in tensors + [None]:
            if t is not None:
                bucket.append(t)
                nbytes += t.numel() * t.element_size()
            if bucket and (t is None or nbytes >= bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket]).div_(size)  # gloo has no AVG: divide, then sum
                dist.all_reduce(flat, group=dp_group)
                for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                    b.copy_(part.view_as(b))
                bucket, nbytes = [], 0
