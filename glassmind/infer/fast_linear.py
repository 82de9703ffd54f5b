"""Decode-time linear layers: the same y = x W^T + b, computed by a faster kernel for a decode step's few rows.

A decode step multiplies a handful of rows (one per sequence) by every weight matrix, so it is bound by
reading the weights. torch's own F.linear at these shapes calls a GEMM that re-lays-out (packs) the weight
on every call; packing once per generate call and reusing the packed copy for every step is what saves the
time. Measured on this repo's 2-core Xeon (AVX-512, AMX), one thread, the 4-layer d_model 256 vocab 8192
model, CPU ms per decode step, plain F.linear -> packed (see benchmarks/RESULTS.md):

    fp32, MKL packed GEMM (cblas_sgemm_pack)    rows 1: 2.33 -> 2.32   2: 2.52 -> 2.51   4: 3.85 -> 3.05
                                                rows 8: 5.60 -> 4.57   16: 6.80 -> 5.65  32: 10.4 -> 9.09
    bf16, oneDNN packed matmul (AMX)            rows 1: 4.40 -> 3.22   4: 4.00 -> 2.94   8: 5.38 -> 4.22
                                                rows 16: 4.58 -> 3.56  32: 7.15 -> 5.94

and at RL rollout sizes (the same products called alone, per step): 64 rows fp32 6.4 -> 5.6, bf16 2.2 -> 1.6;
256 rows fp32 23.5 -> 20.8, bf16 4.4 -> 3.8. So fp32 packs from 3 rows on (below that MKL's matrix-vector
path is already as fast) and bf16 always.
A pre-transposed weight (addmm with W^T) was measured too and is not used: no faster in the model's step.

Both kernels are private torch ops (torch.ops.mkl._mkl_linear, torch.ops.mkldnn._linear_pointwise: the ones
inductor itself emits for frozen CPU linears). A future torch may drop or change them, so each is used only
after a probe at first use shows that it exists and gives F.linear's numbers; otherwise F.linear runs.

Weights change between generate calls (PPO/GRPO roll out with the engine between optimizer steps, and a
fused AdamW step does not even bump the parameters' version counters), so a DecodeView is built, and its
weights packed, once per generate call (8-13 ms for this model), never kept across calls; a call with fewer
than PACK_MIN_STEPS decode steps does not pack. The model's own
modules are never touched: the view is a copy of the module tree that shares every parameter and has each
nn.Linear replaced by a PackedLinear.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from glassmind.common import cpu_bf16_support

MKL_MIN_ROWS = 3  # fp32: fewer rows run MKL's matrix-vector path, which packing does not beat (table above)
# Packing this model's weights costs 8-13 ms and saves 0.5-1 ms per step (batch 8 fp32, batch 1 bf16): a
# call with fewer decode steps than this (a short reply) keeps F.linear rather than pay more than it saves
PACK_MIN_STEPS = 32


@functools.cache
def mkl_works() -> bool:
    """True if torch's private MKL packed-GEMM ops exist and give F.linear's numbers on a probe."""
    g = torch.Generator().manual_seed(0)
    w, b, x = (torch.randn(s, generator=g) for s in ((48, 32), (48,), (5, 32)))
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 5)
        y = torch.ops.mkl._mkl_linear(x, packed, w, b, 5)
    except Exception:  # a missing op (AttributeError), a build without MKL (RuntimeError), a new signature
        return False
    return y.shape == (5, 48) and torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@functools.cache
def onednn_works(dtype: torch.dtype) -> bool:
    """True if torch's private oneDNN packed-linear ops exist and give F.linear's numbers (to the dtype's
    rounding) on a probe."""
    g = torch.Generator().manual_seed(0)
    w, b, x = (torch.randn(s, generator=g).to(dtype) for s in ((48, 32), (48,), (5, 1, 32)))
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 5)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    except Exception:
        return False
    return y.shape == (5, 1, 48) and y.dtype == dtype and torch.allclose(
        y.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)


def choose_kernel(weight: torch.Tensor, rows: int) -> str:
    """'mkl' | 'onednn' | 'linear' for a (N, K) weight multiplied by `rows` rows at a time."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return "linear"
    if weight.dtype == torch.float32 and rows >= MKL_MIN_ROWS and mkl_works():
        return "mkl"
    # bf16 packing was measured on AMX only; where torch's bf16 is not native (AVX2, and AMX hidden by
    # ONEDNN_MAX_CPU_ISA=AVX2: rows 8 x 8192 x 256, F.linear 2.59 ms, packed 2.60 ms) it saves nothing
    if weight.dtype == torch.bfloat16 and cpu_bf16_support().native and onednn_works(torch.bfloat16):
        return "onednn"
    return "linear"


class PackedLinear(nn.Module):
    """x (..., K) -> x W^T + b (..., N) with W (N, K) packed once for `rows` rows per call.

    weight and bias are the source tensors (shared, not copied); the packed copy is made here and is valid
    as long as they do not change, which is why a view lives for one generate call only. MKL's packed GEMM
    is laid out for exactly `rows` rows: fewer rows (sequences that finished and left the batch) are padded
    with zero rows up to `rows` while that stays the faster choice, and run F.linear below MKL_MIN_ROWS."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, kernel: str | None = None):
        super().__init__()
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.rows = rows
        self.kernel = kernel or choose_kernel(self.weight, rows)
        self.packed: torch.Tensor | None = None
        if self.kernel == "mkl":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, rows)
        elif self.kernel == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # e.g. under autocast: the packed copy holds the weight's dtype
            return F.linear(x, self.weight, self.bias)
        if self.kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.kernel == "mkl":
            n = x.numel() // x.shape[-1]
            if n == self.rows:
                return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
            if MKL_MIN_ROWS <= n < self.rows:
                x2 = x.reshape(n, -1)                                                   # (n, K)
                padded = torch.cat([x2, x2.new_zeros(self.rows - n, x2.shape[1])])     # (rows, K)
                y = torch.ops.mkl._mkl_linear(padded, self.packed, self.weight, self.bias, self.rows)
                return y[:n].reshape(*x.shape[:-1], -1)                                # (..., N)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, rows={self.rows}, kernel={self.kernel}"


def _clone_tree(module: nn.Module, swap, memo: dict[int, nn.Module]) -> nn.Module:
    """A copy of the module tree whose modules are shallow copies (same parameters, buffers, hooks, flags),
    with every plain nn.Linear replaced by swap(linear). Shared submodules stay shared."""
    if id(module) in memo:
        return memo[id(module)]
    if type(module) is nn.Linear:  # exactly nn.Linear: a subclass (tensor-parallel, LoRA) keeps its forward
        new = swap(module)
    else:
        new = copy.copy(module)
        new.__dict__["_modules"] = {name: None if child is None else _clone_tree(child, swap, memo)
                                    for name, child in module._modules.items()}
    memo[id(module)] = new
    return new


def can_view(model: nn.Module) -> bool:
    """A view would hide what an observer of the model expects to see: hooks on a linear layer (the autopsy
    observes from outside through them). Then decode with the model. Only glassmind Transformers (features,
    output_projection) have a view."""
    if not hasattr(model, "output_projection") or not hasattr(model, "features"):
        return False
    for m in model.modules():
        if type(m) is nn.Linear and (m._forward_hooks or m._forward_pre_hooks):
            return False
    return True


def worth_packing(model: nn.Module, rows: int, steps: int) -> bool:
    """Whether `steps` decode steps of `rows` sequences should run a DecodeView: a long enough call, a model
    that can have one, and a kernel other than F.linear for its weights (one dtype per model)."""
    return steps >= PACK_MIN_STEPS and can_view(model) and choose_kernel(model.output_projection()[0], rows) != "linear"


def packed_decode(model: nn.Module, steps: int):
    """The engine's packed path: rows -> the module a call's decode steps run, a DecodeView of `model` when
    packing is worth it for that many rows and up to `steps` steps (worth_packing), else `model` itself."""
    return lambda rows: DecodeView(model, rows) if worth_packing(model, rows, steps) else model


class DecodeView:
    """A decoder (glassmind Transformer) for decode steps of `rows` sequences: `features` and `lm_logits`
    as the model's, every nn.Linear and the LM head computed by PackedLinear. Build one per generate call
    (the packed weights are a snapshot of the model's)."""

    def __init__(self, model: nn.Module, rows: int):
        self.rows = rows
        self.model = _clone_tree(model, lambda lin: PackedLinear(lin.weight, lin.bias, rows), {})
        self.head = PackedLinear(*model.output_projection(), rows)                     # (V, C) tied or not

    def features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.features(*args, **kwargs)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)                                                     # (B, T, V)

    def kernels(self) -> dict[str, int]:
        """How many linears (the head included) run each kernel."""
        out: dict[str, int] = {}
        for m in [*self.model.modules(), self.head]:
            if isinstance(m, PackedLinear):
                out[m.kernel] = out.get(m.kernel, 0) + 1
        return out
