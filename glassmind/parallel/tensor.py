"""Tensor parallelism: Megatron-LM's split of each block over the ranks of a TP group (Shoeybi et al. 2019,
sec. 3), with DTensor `parallelize_module`.

Attention: q, k and v projections are split by columns (output features), so rank r computes heads
[r*H/tp, (r+1)*H/tp) entirely locally; the output projection is split by rows (input features) and its
partial results are summed with one all-reduce. FFN: up (and gate) by columns, down by rows, one all-reduce.
Per block, forward costs two all-reduces of (B, T, C) and backward two more (fig. 4 of the paper, f and g).

Embeddings, norms and the LM head stay replicated: every TP rank sees the same full residual stream (B, T, C)
and computes identical gradients for them.

The attention module reads its head counts from `n_heads` / `n_kv_heads` to reshape (B, T, H*D) into
heads. After the split its projections return H/tp heads, so those attributes are set to the local counts:
done here, from outside; the model file knows nothing of it.
"""

from __future__ import annotations

import torch
from torch import nn

from glassmind.parallel.fsdp import blocks_of


# Megatron's split, by the name of the Linear inside a block (attention: q/k/v/out; FFN: up/gate/down)
TP_STYLE = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "out_proj": "rowwise",
            "up": "colwise", "gate": "colwise", "down": "rowwise"}


def tp_plan(block: nn.Module) -> dict[str, str]:
    """{path of each Linear inside the block: 'colwise' | 'rowwise'}."""
    return {path: TP_STYLE[path.rsplit(".", 1)[-1]] for path, m in block.named_modules()
            if isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in TP_STYLE}


def check_attention_splits(cfg, tp: int) -> None:
    """Fail clearly, before any collective, if the model's attention cannot run on 1/tp of its heads.

    Runs a copy of one attention module on the CPU with its projections cut to the local width, as a TP rank
    will. The attention must reshape its heads' output to the width it has ((B, T, H_local * D)), not to
    the width of its input."""
    from glassmind.common import GlassmindError
    from glassmind.model.transformer import MultiHeadAttention

    with torch.device("cpu"):
        attn = MultiHeadAttention(cfg)
    local = cfg.d_model // tp
    kv_local = cfg.n_kv_heads * cfg.head_dim // tp
    attn.q_proj, attn.out_proj = nn.Linear(cfg.d_model, local), nn.Linear(local, cfg.d_model)
    attn.k_proj, attn.v_proj = nn.Linear(cfg.d_model, kv_local), nn.Linear(cfg.d_model, kv_local)
    attn.n_heads, attn.n_kv_heads = cfg.n_heads // tp, cfg.n_kv_heads // tp
    attn.rope_theta = None
    try:
        with torch.no_grad():
            attn(torch.zeros(1, 2, cfg.d_model), mask=None, is_causal=True)
    except RuntimeError as e:
        raise GlassmindError(
            f"tensor parallelism: this model's attention does not run on 1/{tp} of its heads ({e}). In "
            "glassmind/model/transformer.py, MultiHeadAttention.forward must reshape its output with the width "
            "it has: y.transpose(1, 2).reshape(B, T, -1), not reshape(B, T, C)") from None


def apply_tp(model: nn.Module, tp_mesh) -> None:
    """Split every block of `model` in place over the 1-D mesh `tp_mesh`; its Linear weights become DTensors
    (colwise: sharded on dim 0, output features; rowwise: on dim 1, input features; rowwise biases whole)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    for block in blocks_of(model):
        parallelize_module(block, tp_mesh, {path: ColwiseParallel() if how == "colwise" else RowwiseParallel()
                                            for path, how in tp_plan(block).items()})
        for attn in (block.self_attn, getattr(block, "cross_attn", None)):
            if attn is not None:
                attn.n_heads //= tp
                attn.n_kv_heads //= tp
