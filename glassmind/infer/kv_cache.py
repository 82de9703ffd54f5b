"""The KV cache: keys and values of every past position, per layer, preallocated once.

During decoding each new token's query must attend to the keys and values of all earlier tokens. They do
not change once computed (a causal model never revisits the past), so we keep them and compute only the
new token's: the per-token cost drops from O(T) forward passes of the whole prefix to one token's pass.

Layout per layer: (B, H_kv, max_len, head_dim), written at [pos : pos + T_new]. Preallocated for the
batch and the maximum length so that decoding never re-allocates (a torch.cat per token would copy the
whole cache every step). The model duck-types this object; see docs/contracts.md.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_heads, max_len, head_dim)
        # empty, not zeros: only positions already written are ever read
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        # encoder-decoder: cross-attention keys/values of the (fixed) encoder output, filled on first use
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.pos = 0
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> "KVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_decoder_layers, batch, cfg.n_kv_heads, max_len or cfg.context_length, cfg.head_dim,
                   dtype=dtype or p.dtype, device=device or p.device)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H_kv, T_new, D) at [pos, pos+T_new); return the filled views (B, H_kv, pos+T_new, D)."""
        end = self.pos + k_new.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.pos:end] = k_new
        self.v[layer][:, :, self.pos:end] = v_new
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows: beam search reorders beams, finished sequences are dropped."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]

    def reset(self) -> None:
        self.pos = 0
        self.cross = [None] * len(self.cross)


class StaticKVCache:
    """A KVCache's buffers seen with shapes that never change, for a compiled decode step.

    `update` writes the new keys/values (B, H_kv, T_new, D) at the slots held in the tensor `index` (T_new,)
    and returns the buffers' first `n_keys` slots (B, H_kv, n_keys, D) (all of them if None); the caller
    passes a 4-D attention mask over those slots and explicit positions. Nothing the model reads from it is
    a Python number that changes per token (n_keys comes from the mask's shape, which a compiled step marks
    dynamic), so the step compiles once. `pos` stays 0: the model reads it only to build masks and default
    positions, which the caller supplies.
    """

    pos = 0

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], index: torch.Tensor,
                 n_keys: int | None = None):
        self.k, self.v, self.index, self.n_keys = k, v, index, n_keys
        self.cross: list = [None] * len(k)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.index, k_new)
        self.v[layer].index_copy_(2, self.index, v_new)
        return self.k[layer][:, :, : self.n_keys], self.v[layer][:, :, : self.n_keys]

    def advance(self, n: int) -> None:
        pass  # the caller moves `index` and the mask
