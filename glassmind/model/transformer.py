"""The Transformer, top to bottom, in the order a person learns it.

    1. ModelConfig            every dial, with the three families: encoder | decoder | encoder-decoder
    2. positional encodings   sinusoidal (Vaswani et al. 2017, sec. 3.5), learned, rotary (Su et al. 2021)
    3. normalisation          LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019)
    4. multi-head attention   scaled dot product (eq. 1 of Vaswani et al.), self and cross, GQA
    5. feed-forward network   two linear maps around a non-linearity (or a gated one: SwiGLU, Shazeer 2020)
    6. the block              residual connections around each sublayer, norm post or pre
    7. embeddings and stacks  token embedding + position -> N blocks -> (final norm)
    8. Transformer            the three families in one module, their heads, init, save

A variant is a config field that changes a line, not a subclass. The model knows nothing of parallelism,
compilation, KV-cache allocation or autopsy: those are applied from outside (see docs/contracts.md for the
cache object it duck-types).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from glassmind.common import GlassmindError

# ======================================================================================================
# 1. Configuration
# ======================================================================================================

ARCHS = ("encoder", "decoder", "encoder-decoder")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONALS = ("sinusoidal", "learned", "rope", "none")
HEADS = ("lm", "mlm", "classification", "token_classification", "none")


@dataclass
class ModelConfig:
    arch: Literal["encoder", "decoder", "encoder-decoder"] = "decoder"
    vocab_size: int = 8192
    context_length: int = 256            # longest sequence (per side for encoder-decoder)
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None        # < n_heads: grouped-query attention (Ainslie et al. 2023); None = n_heads
    n_layers: int = 4                    # decoder layers, or encoder layers for arch="encoder"
    n_encoder_layers: int | None = None  # encoder-decoder only; None = n_layers
    d_ff: int | None = None              # None: 4 * d_model (8/3 * d_model rounded to 64 for gated FFNs)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: Literal["pre", "post"] = "pre"
    final_norm: bool | None = None       # None: True for pre-norm (the residual stream is never normalised
                                         # otherwise), False for post-norm (each block already ends in a norm)
    positional: str = "learned"
    rope_theta: float = 10000.0
    bias: bool = True                    # biases in linear layers and norms
    tie_embeddings: bool = True          # output projection = token embedding matrix (Press & Wolf 2017)
    dropout: float = 0.0
    attention_dropout: float | None = None  # None: same as dropout
    head: str | None = None              # None: "lm" for decoders/encoder-decoders, "mlm" for encoders
    num_labels: int = 2                  # classification heads
    pad_token_id: int | None = None
    init_std: float = 0.02
    # -- variants that exist so other models' weights load unchanged (model/interop.py); each changes a line
    sinusoidal_layout: Literal["interleaved", "halves"] = "interleaved"  # halves: [sin..., cos...] (Marian)
    position_offset: int = 0             # learned table rows skipped before position 0 (BART uses 2)
    scale_embeddings: bool = False       # multiply token embeddings by sqrt(d_model) (Vaswani sec. 3.4; Marian)
    embedding_norm: bool = False         # normalise the summed embeddings (BERT, BART)
    type_vocab_size: int = 0             # > 0: segment (token type) embeddings (BERT)
    lm_head_bias: bool = False           # a bias on the output logits (BART/Marian final_logits_bias)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.arch == "encoder-decoder" and self.n_encoder_layers is None:
            self.n_encoder_layers = self.n_layers
        if self.d_ff is None:
            if self.activation in ("swiglu", "geglu"):  # keep the parameter count of a 4x FFN (Shazeer 2020)
                self.d_ff = int(math.ceil(8 * self.d_model / 3 / 64) * 64)
            else:
                self.d_ff = 4 * self.d_model
        if self.final_norm is None:
            self.final_norm = self.norm_position == "pre"
        if self.attention_dropout is None:
            self.attention_dropout = self.dropout
        if self.head is None:
            self.head = "mlm" if self.arch == "encoder" else "lm"
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise GlassmindError(f"invalid model config: {msg}")

        need(self.arch in ARCHS, f"arch {self.arch!r} must be one of {ARCHS}")
        need(self.activation in ACTIVATIONS, f"activation {self.activation!r} must be one of {ACTIVATIONS}")
        need(self.norm in NORMS, f"norm {self.norm!r} must be one of {NORMS}")
        need(self.norm_position in ("pre", "post"), "norm_position must be 'pre' or 'post'")
        need(self.positional in POSITIONALS, f"positional {self.positional!r} must be one of {POSITIONALS}")
        need(self.head in HEADS, f"head {self.head!r} must be one of {HEADS}")
        need(self.vocab_size > 0 and self.context_length > 0 and self.d_model > 0, "sizes must be positive")
        need(self.n_layers >= 1, "n_layers must be >= 1")
        need(self.d_model % self.n_heads == 0,
             f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        need(self.n_heads % self.n_kv_heads == 0,  # type: ignore[operator]
             f"n_heads {self.n_heads} must be divisible by n_kv_heads {self.n_kv_heads}")
        need(self.positional != "rope" or self.head_dim % 2 == 0, "rope needs an even head dimension")
        need(self.arch != "encoder" or self.head != "lm", "an encoder has no causal LM head: use head='mlm'")
        need(self.arch == "encoder" or self.head in ("lm", "none"),
             f"head {self.head!r} is for encoders; decoders and encoder-decoders use 'lm'")
        need(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_decoder_layers(self) -> int:
        return 0 if self.arch == "encoder" else self.n_layers

    @property
    def n_encoder_layers_total(self) -> int:
        if self.arch == "encoder":
            return self.n_layers
        return self.n_encoder_layers if self.arch == "encoder-decoder" else 0  # type: ignore[return-value]

    @property
    def total_layers(self) -> int:
        return self.n_encoder_layers_total + self.n_decoder_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GlassmindError(f"config.json has unknown model fields {unknown}: was it written by a newer "
                                 "glassmind? Upgrade glassmind or remove those fields.")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    # -- size and cost ---------------------------------------------------------------------------------
    def num_params(self, *, non_embedding: bool = False) -> int:
        """Exact parameter count, by building the model on the meta device (no memory, no init)."""
        with torch.device("meta"):
            model = Transformer(self)
        return model.num_params(non_embedding=non_embedding)

    def flops_per_token(self, seq_len: int | None = None, *, training: bool = True) -> float:
        """Matmul FLOPs per token (Kaplan et al. 2020, table 1; PaLM appendix B).

        forward = 2 * (parameters used in matmuls) + attention scores and weighted sum: 2 * 2 * T * d per
        layer (QK^T and AV, counted over the full T x T square as PaLM does); training = 3 x forward
        (backward costs twice the forward). For encoder-decoders this is per (source + target) token pair
        and counts every layer, a mild over-estimate.
        """
        T = seq_len or self.context_length
        n_matmul = self.num_params(non_embedding=True)
        if self.tie_embeddings and self.head in ("lm", "mlm"):
            n_matmul += self.vocab_size * self.d_model  # the tied output projection is a matmul too
        forward = 2 * n_matmul + 4 * self.total_layers * T * self.d_model
        return float(3 * forward if training else forward)


# ======================================================================================================
# 2. Positional encodings
# ======================================================================================================


def sinusoidal_table(n_positions: int, d_model: int, layout: str = "interleaved") -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))  -> (n_positions, d).

    Each pair (sin, cos) at frequency w_i rotates by the angle k * w_i when pos moves by k, so PE(pos + k)
    is a fixed linear map of PE(pos) for every pos (sec. 3.5): the model can attend by relative offset.
    `halves` puts all the sines first and all the cosines after (Marian's layout); same frequencies.
    """
    half = (d_model + 1) // 2
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]                     # (P, 1)
    freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) * 2 / d_model)  # (half,)
    angle = pos * freq                                                                 # (P, half)
    pe = torch.zeros(n_positions, d_model, dtype=torch.float64)
    if layout == "interleaved":
        pe[:, 0::2] = torch.sin(angle)
        pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    else:
        pe[:, :half] = torch.sin(angle)
        pe[:, half:] = torch.cos(angle[:, : d_model - half])
    return pe.float()


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for given positions (B, T) -> each (B, 1, T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))                               # (D/2,)
    angle = positions.float()[..., None] * inv_freq                       # (B, T, D/2)
    angle = torch.cat([angle, angle], dim=-1)[:, None]                     # (B, 1, T, D)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+D/2}) pair by its angle (the 'rotate half' form of RoFormer eq. 34)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ======================================================================================================
# 3. Normalisation
# ======================================================================================================


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# ======================================================================================================
# 4. Multi-head attention
# ======================================================================================================


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head)) V for each head, heads concatenated and projected (Vaswani eq. 1-2).

    Self-attention when `memory` is None, cross-attention (queries from the decoder, keys and values from
    the encoder output) otherwise. With n_kv_heads < n_heads, groups of query heads share one key/value
    head (GQA), which shrinks the KV cache by n_heads / n_kv_heads.
    """

    def __init__(self, cfg: ModelConfig, *, is_cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.is_cross = is_cross
        self.dropout = cfg.attention_dropout
        self.rope_theta = cfg.rope_theta if cfg.positional == "rope" and not is_cross else None
        kv_dim = cfg.n_kv_heads * cfg.head_dim  # type: ignore[operator]
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, T, n*D) -> (B, n, T, D)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, memory: torch.Tensor | None = None,
                cache: Any = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)                               # (B, H, T, D)
        if self.is_cross:
            kv = cache.cross[layer] if cache is not None and cache.cross[layer] is not None else None
            if kv is None:  # the encoder output is fixed during decoding: project it once, then reuse
                assert memory is not None
                kv = (self._heads(self.k_proj(memory), self.n_kv_heads),
                      self._heads(self.v_proj(memory), self.n_kv_heads))                # (B, Hkv, S, D)
                if cache is not None:
                    cache.cross[layer] = kv
            k, v = kv
        else:
            k = self._heads(self.k_proj(x), self.n_kv_heads)                          # (B, Hkv, T, D)
            v = self._heads(self.v_proj(x), self.n_kv_heads)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.update(layer, k, v)                                       # (B, Hkv, Tpast+T, D)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)   # (B, H, Tk, D)
        # the fused kernel never materialises the weights; glassmind/autopsy recomputes them from outside
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                           is_causal=is_causal and mask is None)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D); -1: under tensor parallel H is the local heads
        return self.out_proj(y)



# ======================================================================================================
# 5. Feed-forward network
# ======================================================================================================


# the function each activation applies (a gated one applies it to W_gate x)
ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
                  "silu": F.silu, "swiglu": F.silu, "geglu": F.gelu}
GATED = ("swiglu", "geglu")


class FeedForward(nn.Module):
    """FFN(x) = W2 act(W1 x + b1) + b2, applied to every position alone (Vaswani eq. 2).

    Gated variants (SwiGLU, GeGLU; Shazeer 2020) multiply act(W_gate x) by a second projection W1 x.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        self.act = ACTIVATION_FNS[cfg.activation]  # resolved once, not per call
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)  # type: ignore[arg-type]
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.activation in GATED else None  # type: ignore[arg-type]
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)                                                               # (B, T, d_ff)
        if self.gate is None:
            h = self.act(h)
        else:                                                                        # GLU: act(W_gate x) * W1 x
            h = self.act(self.gate(x)) * h
        return self.down(h)                                                          # (B, T, C)


# ======================================================================================================
# 6. The block: sublayers wrapped in residual connections and normalisation
# ======================================================================================================


class Block(nn.Module):
    """One layer. post-norm (the original): x = Norm(x + Sublayer(x)).
    pre-norm (GPT-2 onwards):              x = x + Sublayer(Norm(x)); trains stably at depth without warmup
    tricks because the residual stream carries an un-normalised identity path (Xiong et al. 2020)."""

    def __init__(self, cfg: ModelConfig, *, has_cross: bool = False):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.self_attn = MultiHeadAttention(cfg)
        self.self_attn_norm = make_norm(cfg)
        self.cross_attn = MultiHeadAttention(cfg, is_cross=True) if has_cross else None
        self.cross_attn_norm = make_norm(cfg) if has_cross else None
        self.ffn = FeedForward(cfg)
        self.ffn_norm = make_norm(cfg)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, *, mask, is_causal, rope, memory=None, memory_mask=None,
                cache=None, layer: int = 0) -> torch.Tensor:
        attend = dict(mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=layer)
        cross = dict(mask=memory_mask, memory=memory, cache=cache, layer=layer)
        if self.pre:  # x + Sublayer(Norm(x))
            x = x + self._dropout(self.self_attn(self.self_attn_norm(x), **attend))
            if self.cross_attn is not None:
                x = x + self._dropout(self.cross_attn(self.cross_attn_norm(x), **cross))
            return x + self._dropout(self.ffn(self.ffn_norm(x)))                    # (B, T, C)
        # post-norm: Norm(x + Sublayer(x))
        x = self.self_attn_norm(x + self._dropout(self.self_attn(x, **attend)))
        if self.cross_attn is not None:
            x = self.cross_attn_norm(x + self._dropout(self.cross_attn(x, **cross)))
        return self.ffn_norm(x + self._dropout(self.ffn(x)))                       # (B, T, C)

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        """Residual dropout on a sublayer's output (Vaswani sec. 5.4)."""
        return F.dropout(h, self.dropout, True) if self.training and self.dropout else h


# ======================================================================================================
# 7. Embeddings and stacks
# ======================================================================================================


class Stack(nn.Module):
    """Position information + N blocks (+ a final norm). The encoder stack sees every token; the decoder
    stack is causal and, in an encoder-decoder, cross-attends to the encoder output.

    The token embedding is owned by the Transformer (shared by both stacks of an encoder-decoder and tied
    to the output projection), so a stack starts from already-embedded tokens."""

    def __init__(self, cfg: ModelConfig, n_layers: int, *, causal: bool, has_cross: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        if cfg.positional == "learned":
            self.position_embedding = nn.Embedding(cfg.context_length + cfg.position_offset, cfg.d_model)
        elif cfg.positional == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(cfg.context_length, cfg.d_model,
                                                              cfg.sinusoidal_layout), persistent=False)
        self.token_type_embedding = (nn.Embedding(cfg.type_vocab_size, cfg.d_model)
                                     if cfg.type_vocab_size > 0 and not causal else None)
        self.embedding_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, has_cross=has_cross) for _ in range(n_layers))
        self.final_norm = make_norm(cfg) if cfg.final_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """Embedded tokens (B, T, C) -> the stack's output (B, T, C): positions and the rest of the embedding,
        then every block, then the final norm."""
        cfg = self.cfg
        past = cache.pos if cache is not None else 0
        self._check_context(x.shape[1], positions, past, cache, key_mask)
        x = self.embed(x, positions, token_type_ids)                                 # (B, T, C)
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta) if cfg.positional == "rope" else None
        mask = attention_mask(x.shape[1], past, key_mask, causal=self.causal, device=x.device)
        # Causal with nothing to mask and no cache: let the fused kernel build the triangle itself.
        is_causal = self.causal and mask is None and past == 0
        mem_mask = None if memory_mask is None else memory_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, is_causal=is_causal, rope=rope, memory=memory, memory_mask=mem_mask,
                      cache=cache, layer=i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.final_norm(x) if self.final_norm is not None else x              # (B, T, C)

    def embed(self, x: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, C) + position information + segment embeddings, normalised and dropped out
        as the config says. (Rotary positions act inside attention instead.)"""
        cfg = self.cfg
        if cfg.scale_embeddings:
            x = x * math.sqrt(cfg.d_model)
        if cfg.positional == "learned":
            x = x + self.position_embedding(positions + cfg.position_offset)          # (B, T, C)
        elif cfg.positional == "sinusoidal":
            x = x + self.sinusoid[positions].to(x.dtype)
        if self.token_type_embedding is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(positions)
            x = x + self.token_type_embedding(types)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self.dropout(x)

    def _check_context(self, T: int, positions: torch.Tensor, past: int, cache: Any,
                       key_mask: torch.Tensor | None) -> None:
        """No position beyond the context. Without a cache: one look at the positions. With a cache and no
        padding the last position is past + T - 1: an int check, no device sync per decoded token. With a cache
        and padding, cache slots outrun positions; the caller (the engine) stops each sequence at the limit."""
        if cache is None:
            last = int(positions.max()) if positions.numel() else -1
        else:
            last = past + T - 1 if key_mask is None else -1
        if last >= self.cfg.context_length:
            raise GlassmindError(f"position {last} is beyond the model's context length "
                                 f"{self.cfg.context_length}: shorten the input")


def attention_mask(T: int, past: int, key_mask: torch.Tensor | None, *, causal: bool,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, past+T), True where a query may attend a key; None if nothing is masked.

    Query t (absolute position past+t) sees keys <= past+t when causal, and never a padding key. A row that
    would see no key at all (a left-padding query) is allowed its own position, so softmax stays finite;
    such rows are padding and nobody reads them.

    A 4-D key_mask (B or 1, 1, T, Tk) is taken as the finished mask: a caller that decodes many steps (the
    inference engine) builds it once instead of per token, or attends over a fixed-size cache.
    """
    if key_mask is not None and key_mask.dim() == 4:
        return key_mask
    if not causal and key_mask is None:
        return None
    if causal and key_mask is None and (past == 0 or T == 1):
        return None  # is_causal covers the first case; one newest query may see every key in the second
    Tk = past + T
    mask = torch.ones(1, 1, T, Tk, dtype=torch.bool, device=device)
    if causal:
        mask = mask.tril(past)
    if key_mask is not None:
        if key_mask.shape[-1] != Tk:
            raise GlassmindError(f"attention mask covers {key_mask.shape[-1]} positions but there are {Tk} "
                                 f"keys ({past} cached + {T} new): pass a mask over all of them")
        mask = mask & key_mask[:, None, None, :].bool()                              # (B, 1, T, Tk)
        own = torch.zeros(T, Tk, dtype=torch.bool, device=device)
        own[torch.arange(T), past + torch.arange(T)] = True
        mask = mask | (own & ~mask.any(-1, keepdim=True))
    return mask


def default_positions(ids: torch.Tensor, cache: Any, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions (B, T) of the new tokens: counted over real tokens only when a padding mask is given (so a
    left-padded prompt starts at 0), else past + arange(T)."""
    B, T = ids.shape
    past = cache.pos if cache is not None else 0
    if key_mask is not None and key_mask.dim() == 2 and key_mask.shape[-1] == past + T:
        pos = key_mask.long().cumsum(-1) - 1                                          # (B, past+T)
        return pos[:, past:].clamp(min=0)
    return (past + torch.arange(T, device=ids.device)).expand(B, T)


# ======================================================================================================
# 8. The Transformer: three families, their heads, initialisation
# ======================================================================================================


class EncoderOutput(NamedTuple):
    hidden: torch.Tensor           # (B, T, C)
    logits: torch.Tensor | None    # the head's output, see ModelConfig.head


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from glassmind.model import heads  # the heads sit on the stacks' output; kept in their own file

        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=None)
        self.encoder = (Stack(cfg, cfg.n_encoder_layers_total, causal=False, has_cross=False)
                        if cfg.arch in ("encoder", "encoder-decoder") else None)
        self.decoder = (Stack(cfg, cfg.n_layers, causal=True, has_cross=cfg.arch == "encoder-decoder")
                        if cfg.arch in ("decoder", "encoder-decoder") else None)
        self.lm_head = None
        if cfg.head == "lm" and not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.head == "lm" and cfg.lm_head_bias else None
        self.head = heads.make_head(cfg, self.token_embedding)
        self.reset_parameters()

    # -- initialisation ----------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """N(0, 0.02) for matrices and embeddings, zero biases, unit norm gains (GPT-2 / BERT). Residual
        output projections (attention out, FFN down) get std / sqrt(2 * layers): each of the 2L sublayers
        adds to the residual stream, so without it the stream's variance grows with depth (GPT-2 paper,
        sec. 2.3)."""
        cfg = self.config
        layers = cfg.total_layers
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("bias") or name == "lm_bias":
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("out_proj.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * layers))
            else:
                nn.init.normal_(p, std=cfg.init_std)

    # -- the families ------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, tgt_ids: torch.Tensor | None = None, **kw: Any):
        cfg = self.config
        if cfg.arch == "decoder":
            return self.lm_logits(self.features(ids, **kw))                          # (B, T, V)
        if cfg.arch == "encoder":
            hidden = self.features(ids, **kw)
            logits = self.head(hidden, self.token_embedding.weight) if self.head is not None else None
            return EncoderOutput(hidden, logits)
        if tgt_ids is None:
            raise GlassmindError("an encoder-decoder takes source and target ids: model(src_ids, tgt_ids)")
        return self.lm_logits(self.features(ids, tgt_ids, **kw))                    # (B, T_tgt, V)

    def features(self, ids: torch.Tensor, tgt_ids: torch.Tensor | None = None, *,
                 attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                 cache: Any = None, token_type_ids: torch.Tensor | None = None,
                 src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) before any head: the decoder's (or, for an encoder, the encoder's)."""
        cfg = self.config
        self._check_ids(ids)
        if cfg.arch == "decoder":
            positions = positions if positions is not None else default_positions(ids, cache, attention_mask)
            return self.decoder(self.token_embedding(ids), positions, key_mask=attention_mask, cache=cache)
        if cfg.arch == "encoder":
            positions = positions if positions is not None else default_positions(ids, None, None)
            return self.encoder(self.token_embedding(ids), positions, key_mask=attention_mask,
                                token_type_ids=token_type_ids)
        if tgt_ids is None:
            raise GlassmindError("an encoder-decoder takes source and target ids: model(src_ids, tgt_ids)")
        src_mask = src_mask if src_mask is not None else attention_mask
        memory = self.encode(ids, src_mask)
        return self.decode_features(tgt_ids, memory, src_mask=src_mask, tgt_mask=tgt_mask,
                                    positions=positions, cache=cache)

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (memory) (B, S, C) of an encoder-decoder (or the hidden states of an encoder)."""
        self._check_ids(src_ids)
        positions = default_positions(src_ids, None, None)
        return self.encoder(self.token_embedding(src_ids), positions, key_mask=src_mask)

    def decode_features(self, tgt_ids: torch.Tensor, memory: torch.Tensor | None, *,
                        src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
                        positions: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        self._check_ids(tgt_ids)
        positions = positions if positions is not None else default_positions(tgt_ids, cache, tgt_mask)
        return self.decoder(self.token_embedding(tgt_ids), positions, key_mask=tgt_mask, memory=memory,
                            memory_mask=src_mask, cache=cache)

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor | None, **kw: Any) -> torch.Tensor:
        """Decoder logits (B, T, V) given the encoder's memory; with a cache whose cross-attention keys and
        values are filled, `memory` may be None."""
        return self.lm_logits(self.decode_features(tgt_ids, memory, **kw))

    def next_token_logits(self, ids: torch.Tensor, *, positions: torch.Tensor, attention_mask: torch.Tensor,
                          cache: Any) -> torch.Tensor:
        """A decoder's logits (B, V) at the last position, with every input given: positions (B, T), the
        finished 4-D mask (B, 1, T, keys) and a cache. No id checks and no defaults, so torch.compile traces it
        without a data-dependent branch (the engine's compiled decode step; the engine checked the ids)."""
        h = self.decoder(self.token_embedding(ids), positions, key_mask=attention_mask, cache=cache)  # (B, T, C)
        return self.lm_logits(h[:, -1])

    def output_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (V, C), bias (V,) or None) of the projection to the vocabulary: the token embedding when
        `tie_embeddings` is on (a fused loss takes them instead of the logits)."""
        return (self.lm_head.weight if self.lm_head is not None else self.token_embedding.weight), self.lm_bias

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output projection to the vocabulary (B, T, C) -> (B, T, V)."""
        return F.linear(hidden, *self.output_projection())

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2:
            raise GlassmindError(f"token ids must be (batch, time), got shape {tuple(ids.shape)}")
        if ((ids < 0) | (ids >= self.config.vocab_size)).any():  # one check; min/max only for the message
            raise GlassmindError(f"token id out of range [0, {self.config.vocab_size}): got "
                                 f"{int(ids.min())}..{int(ids.max())}; is the tokenizer the model's?")

    # -- size --------------------------------------------------------------------------------------------
    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameters counted once (tied matrices once). non_embedding drops token/position/type tables,
        the count scaling laws use (Kaplan et al. 2020)."""
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if non_embedding and "embedding" in name and "norm" not in name:
                continue
            total += p.numel()
        return total

    # -- buffers -----------------------------------------------------------------------------------------
    def rebuild_buffers(self) -> "Transformer":
        """Recompute the non-persistent buffers (the sinusoid tables), which no weights file holds: after
        building on the meta device and loading weights with assign=True, they still live on meta."""
        for stack in (self.encoder, self.decoder):
            if stack is not None and hasattr(stack, "sinusoid"):
                c = stack.cfg
                stack.sinusoid = sinusoidal_table(c.context_length, c.d_model, c.sinusoidal_layout)
        return self
