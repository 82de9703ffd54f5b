"""AdamW with weight decay on matrices only.

Decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization") shrinks weights
towards zero each step. It is applied to the weight matrices of linear layers (>= 2-D) and not to norm gains,
biases (1-D: decaying them only fights the normalisation) or embedding tables (each row is updated only
when its token appears, so decay would shrink rare tokens' rows far more than their gradient grows them;
GPT-2/nanoGPT and BERT exclude them too). Embeddings can be opted in with `decay_embeddings=True`.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW parameter groups: `decay` (matrices) and `no_decay` (the rest), each parameter once.

    Tied weights (the LM head sharing the token embedding) appear once, classified as an embedding. Order
    follows `model.named_parameters()`, so the optimizer state of two identical models lines up exactly.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():  # named_parameters already skips shared duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_ids
        if p.ndim >= 2 and (decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def adamw(model: nn.Module, *, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
          eps: float = 1e-8, decay_embeddings: bool = False) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`. betas (0.9, 0.95) as GPT-3 (Brown et al. 2020, B.1) for stability.

    The fused kernel (one vectorised pass per parameter, CPU and CUDA) is ~5x faster than the per-tensor
    loop on CPU (8.8 vs 42.6 ms per step for 5.3M parameters, 1 thread) and deterministic, which exact resume
    relies on; elsewhere (MPS, meta, sharded DTensor parameters) PyTorch's default path.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed, or older than 2.5
        DTensor = ()

    groups = param_groups(model, weight_decay, decay_embeddings=decay_embeddings)
    fusable = all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor)
                  for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if fusable else None)
