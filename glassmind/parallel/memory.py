"""What a layout costs each device: memory (weights, gradients, optimizer state, activations) and the bytes
each rank sends per optimizer step. `glassmind plan` prints these; tests check the parameter and optimizer
numbers against what the ranks really hold.

Memory per parameter with AdamW (what this codebase keeps, fp32 or mixed precision alike):

    weights 4 B (fp32; under bf16/fp16 mixed precision this is the master copy, and the 2-byte compute copy
              exists only transiently: one op at a time with autocast, a block or two at a time under FSDP)
    grads   4 B (fp32: autocast and FSDP's reduce dtype both give fp32 gradients)
    AdamW   8 B (m and v, fp32) + one 4-byte step counter per tensor

16 B per parameter in all, the same total as the ZeRO paper's mixed-precision account (Rajbhandari et al.
2020, sec. 3.1: 2 B fp16 weights + 2 B fp16 grads + 12 B fp32 master, m, v), split differently.

Activations: the tensors autograd saves for backward, counted per token per layer for this model
(pre- or post-norm block, fused attention kernel that saves q, k, v, output and one log-sum-exp per head):

    attention  norm + q, k, v, out (4C; GQA keys and values are repeated to C before the kernel)
               + log-sum-exp (H)
    FFN        norm + up, act (2 d_ff), or up, gate, act(gate), product (4 d_ff)
    head       final norm + fp32 log-probabilities (4 V bytes)
    norm       LayerNorm: input and output (2C) + mean and 1/std (2, fp32); RMSNorm (unfused on CPU):
               input, x/rms and output (3C) + 1/rms (1, fp32)

multiplied by the compute dtype's size (the norm statistics and log-probabilities stay fp32). Tensor
parallelism divides the per-head and d_ff terms by tp (the residual stream stays whole: no sequence
parallelism). It is an estimate: dropout masks (when dropout > 0), autocast's cached weight copies and
allocator slack come on top; `measure_saved_activations` measures the real saved bytes.

Communication per optimizer step, bytes sent by one rank, ring algorithms (all-reduce of S bytes over n
ranks: 2 (n-1)/n S; all-gather or reduce-scatter: (n-1)/n S):

    DDP     one all-reduce of the fp32 gradients per step (gradient accumulation skips the others)
    ZeRO-1  the same all-reduce + a broadcast of the updated weights (each rank sends those it owns)
    ZeRO-2  per micro-batch one all-gather of the weights (compute dtype); per step one reduce-scatter of
            the fp32 gradients
    ZeRO-3  per micro-batch two all-gathers (forward and backward); per step one reduce-scatter
    TP      per micro-batch and layer, 4 all-reduces of the (b, T, C) activations (2 forward, 2 backward;
            Megatron's f and g)
    PP      per micro-batch, each stage boundary: activations (b, T, C) forward, their gradients backward
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from glassmind.parallel.mesh import ParallelSpec
from glassmind.parallel.pipeline import stage_layers
from glassmind.parallel.tensor import TP_STYLE

_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Workload:
    global_batch: int   # sequences per optimizer step, all ranks together
    micro_batch: int    # sequences one data-parallel replica runs per forward/backward
    seq_len: int

    def accum(self, dp: int) -> int:
        """Micro-batches per optimizer step (gradient accumulation)."""
        return max(1, self.global_batch // (self.micro_batch * dp))


@dataclass
class RankMemory:
    """Bytes on one device."""
    params: float = 0.0       # persistent weights (this rank's shards)
    grads: float = 0.0
    optimizer: float = 0.0
    gathered: float = 0.0     # transient unsharded weights (FSDP) at the peak
    activations: float = 0.0  # saved for backward, at the peak
    param_numel: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations


# ----------------------------------------------------------------------------------------------------
# parameters: which rank holds how much


def param_table(cfg) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, AdamW group index) of every parameter, each once (tied weights once), in model order.
    Built on the meta device: no memory. Group index as glassmind.train.optim.param_groups assigns it."""
    from glassmind.model import Transformer
    from glassmind.train.optim import param_groups

    with torch.device("meta"):
        model = Transformer(cfg)
    groups = param_groups(model, 0.1)
    group_of = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
    return [(n, tuple(p.shape), group_of.get(id(p), 0)) for n, p in model.named_parameters()]


def stages_of(name: str, cfg, pp: int) -> list[int]:
    """Pipeline stages that hold a parameter (the tied embedding: first and last)."""
    if pp == 1:
        return [0]
    m = _BLOCK.match(name)
    if m:
        layer = int(m.group(2))
        return [s for s, r in enumerate(stage_layers(cfg.n_layers, pp)) if layer in r]
    if name.startswith("token_embedding"):
        return [0, pp - 1] if cfg.tie_embeddings and cfg.head == "lm" else [0]
    if name.startswith(("decoder.position_embedding", "decoder.token_type", "decoder.embedding_norm")):
        return [0]
    return [pp - 1]  # final norm, LM head, its bias


def tp_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape one TP rank holds: colwise Linears split dim 0 (weight and bias), rowwise split the
    weight's dim 1 and keep the bias whole."""
    m = _BLOCK.match(name)
    if tp == 1 or not m:
        return shape
    *path, leaf = m.group(3).split(".")
    style = TP_STYLE.get(path[-1]) if path else None
    if style == "colwise":
        return (shape[0] // tp,) + shape[1:]
    if style == "rowwise" and leaf == "weight":
        return (shape[0], shape[1] // tp)
    return shape


def fsdp_rows(rows: int, dp: int, dp_rank: int) -> int:
    """Rows of dim 0 one FSDP rank holds: torch.chunk's split (ceil(rows/dp) each, the last ones short)."""
    size = -(-rows // dp)
    return max(0, min(size, rows - dp_rank * size))


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def local_params(cfg, spec: ParallelSpec, *, pp_rank: int = 0, dp_rank: int = 0,
                 table=None) -> list[tuple[str, int, int]]:
    """(name, numel this rank holds, group) for the parameters of one rank. TP ranks of a stage hold equal
    amounts, so tp_rank is not needed."""
    out = []
    for name, shape, group in table or param_table(cfg):
        if pp_rank not in stages_of(name, cfg, spec.pp):
            continue
        shape = tp_shape(name, shape, spec.tp)
        if spec.sharded:
            shape = (fsdp_rows(shape[0], spec.dp, dp_rank),) + tuple(shape[1:])
        out.append((name, numel(shape), group))
    return out


def zero1_owned(params: list[tuple[str, int, int]], dp: int) -> list[list[str]]:
    """Which parameters each ZeRO-1 rank updates: per group, largest first, each to the rank with the least so
    far (the greedy partition of torch.distributed.optim.ZeroRedundancyOptimizer)."""
    owned: list[list[str]] = [[] for _ in range(dp)]
    sizes = [0] * dp
    for g in sorted({g for _, _, g in params}):
        for name, n, _ in sorted((p for p in params if p[2] == g), key=lambda p: p[1], reverse=True):
            r = sizes.index(min(sizes))
            owned[r].append(name)
            sizes[r] += n
    return owned


def optimizer_bytes(numels: list[int]) -> int:
    """AdamW state: m and v (fp32) per element + a 4-byte step counter per tensor."""
    return sum(8 * n + 4 for n in numels)


# ----------------------------------------------------------------------------------------------------
# activations


def compute_bytes(mp: str) -> int:
    return 4 if mp == "fp32" else 2


def norm_bytes(cfg, b: int) -> float:
    """Bytes one norm saves per token: activations in the compute dtype (b bytes), statistics in fp32."""
    if cfg.norm == "rmsnorm":
        return 3 * cfg.d_model * b + 4
    return 2 * cfg.d_model * b + 2 * 4


def block_activation_bytes(cfg, b: int, tp: int = 1) -> float:
    """Bytes saved for backward per token by one block (see the module docstring), activations b bytes each."""
    C, H = cfg.d_model, cfg.n_heads
    gated = cfg.activation in ("swiglu", "geglu")
    attn = norm_bytes(cfg, b) + (4 * C / tp + H / tp) * b
    ffn = norm_bytes(cfg, b) + (4 if gated else 2) * cfg.d_ff / tp * b
    cross = attn if cfg.arch == "encoder-decoder" else 0.0
    return attn + ffn + cross


def activation_bytes(cfg, rows: int, seq_len: int, *, layers: int, first: bool = True, last: bool = True,
                     tp: int = 1, mp: str = "fp32") -> float:
    """Bytes saved for backward by one forward of `rows` sequences through `layers` blocks, plus the
    embedding output (first stage) and the head (last stage)."""
    tokens = rows * seq_len
    b = compute_bytes(mp)
    per_token = layers * block_activation_bytes(cfg, b, tp)
    if first:
        per_token += cfg.d_model * b
    if last:
        per_token += norm_bytes(cfg, b) * bool(cfg.final_norm) + 4 * cfg.vocab_size
    return tokens * per_token


def measure_saved_activations(model, ids: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward + loss (weights excluded),
    counted by storage so views are not double-counted."""
    from glassmind.parallel.pipeline import causal_lm_loss

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model(ids), targets)
    del loss
    return sum(saved.values())


# ----------------------------------------------------------------------------------------------------
# per rank


def rank_memory(cfg, spec: ParallelSpec, work: Workload, *, pp_rank: int = 0, dp_rank: int = 0,
                table=None) -> RankMemory:
    table = table or param_table(cfg)
    mine = local_params(cfg, spec, pp_rank=pp_rank, dp_rank=dp_rank, table=table)
    n_local = sum(n for _, n, _ in mine)
    mem = RankMemory(param_numel=n_local)
    mem.params = 4.0 * n_local
    mem.grads = 4.0 * n_local                       # ZeRO-2/3: sharded like the weights; else full
    if spec.zero == 1 and spec.dp > 1:
        owned = set(zero1_owned(mine, spec.dp)[dp_rank])
        mem.optimizer = optimizer_bytes([n for name, n, _ in mine if name in owned])
    else:
        mem.optimizer = optimizer_bytes([n for _, n, _ in mine])

    # transient unsharded weights under FSDP, in the compute dtype
    if spec.sharded:
        unsharded = local_params(cfg, ParallelSpec(tp=spec.tp, pp=spec.pp), pp_rank=pp_rank, table=table)
        blocks = [n for name, n, _ in unsharded if _BLOCK.match(name)]
        root = sum(n for name, n, _ in unsharded if not _BLOCK.match(name))
        n_blocks = max(1, len({_BLOCK.match(name).group(1, 2) for name, _, _ in unsharded if _BLOCK.match(name)}))
        per_block = sum(blocks) / n_blocks
        held = sum(blocks) if spec.zero == 2 else 2 * per_block  # ZeRO-3: current block + the prefetched one
        mem.gathered = compute_bytes(spec.mp) * (held + root)
        mem.notes.append("gathered = unsharded weights during forward/backward")

    rows = work.micro_batch
    if spec.pp > 1:
        layers = len(stage_layers(cfg.n_layers, spec.pp)[pp_rank])
        m = spec.n_microbatches
        in_flight = m if spec.schedule == "gpipe" else min(m, spec.pp - pp_rank)
        mem.activations = in_flight * activation_bytes(cfg, rows // m, work.seq_len, layers=layers,
                                                       first=pp_rank == 0, last=pp_rank == spec.pp - 1,
                                                       tp=spec.tp, mp=spec.mp)
    else:
        mem.activations = activation_bytes(cfg, rows, work.seq_len, layers=cfg.total_layers, tp=spec.tp,
                                           mp=spec.mp)
    return mem


def peak_memory(cfg, spec: ParallelSpec, work: Workload, table=None) -> tuple[RankMemory, int]:
    """The most loaded rank's memory and its pipeline stage."""
    table = table or param_table(cfg)
    best, where = None, 0
    for s in range(spec.pp):
        for d in range(spec.dp if (spec.sharded or spec.zero == 1) else 1):
            mem = rank_memory(cfg, spec, work, pp_rank=s, dp_rank=d, table=table)
            if best is None or mem.total > best.total:
                best, where = mem, s
    return best, where


def comm_bytes(cfg, spec: ParallelSpec, work: Workload, table=None) -> dict[str, float]:
    """Bytes one rank sends per optimizer step, by kind (the largest rank's, pipeline stage 0's weights)."""
    table = table or param_table(cfg)
    accum = work.accum(spec.dp)
    stage_params = sum(n for _, n, _ in local_params(cfg, ParallelSpec(tp=spec.tp, pp=spec.pp), table=table))
    cb = compute_bytes(spec.mp)
    out: dict[str, float] = {}
    dp = spec.dp
    ring = (dp - 1) / dp
    if dp > 1:
        grads = 4.0 * stage_params
        if spec.zero <= 1:
            out["dp all-reduce"] = 2 * ring * grads
            if spec.zero == 1:
                out["zero-1 broadcast"] = ring * 4.0 * stage_params
        else:
            gathers = accum * (1 if spec.zero == 2 else 2)
            out["fsdp all-gather"] = gathers * ring * cb * stage_params
            out["fsdp reduce-scatter"] = ring * grads
    if spec.tp > 1:
        layers = max(len(r) for r in stage_layers(cfg.n_layers, spec.pp)) if spec.pp > 1 else cfg.total_layers
        act = work.micro_batch * work.seq_len * cfg.d_model * cb
        out["tp all-reduce"] = accum * layers * 4 * 2 * (spec.tp - 1) / spec.tp * act
    if spec.pp > 1:
        act = work.micro_batch * work.seq_len * cfg.d_model * cb
        out["pp send/recv"] = accum * 2 * act  # a middle stage: activations forward + gradients backward
    return out
