"""Recurrent language models and a seq2seq with additive attention: what the Transformer replaced.

    RecurrentLM     token embedding -> nn.RNN / nn.LSTM / nn.GRU (torch's fused kernels, the fast path a user
                    would pick) -> projection to the embedding width -> tied output (Press & Wolf 2017)
    Seq2Seq         bidirectional GRU encoder; GRU decoder that attends over the encoder's annotations with
                    Bahdanau et al. (2015)'s additive attention, e_ij = v^T tanh(W s_{i-1} + U h_j)

Each has a `reference_*` function below written from the papers' equations, one time step at a time, on the
module's own weights; the tests hold the fast path equal to it. The cells, in torch's gate order:

    Elman RNN   h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)                               (Elman 1990)
    LSTM        i, f, g, o = split(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)                  (Hochreiter &
                c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g),  h_t = sigmoid(o) tanh(c_t)  Schmidhuber 1997;
                                                                                     forget gate: Gers 2000)
    GRU         r, z, n from W_ih x_t + b_ih and W_hh h_{t-1} + b_hh, split in three;          (Cho et al. 2014)
                r = sigmoid(.r + .r), z = sigmoid(.z + .z), n = tanh(ih_n + r * hh_n),
                h_t = (1 - z) n + z h_{t-1}

Why recurrence lost (the architectures study measures each): step t needs h_{t-1}, so the T steps of a
sequence run one after another (no parallelism over positions in training); and the gradient reaching
position t-k is multiplied by k Jacobians dh_t/dh_{t-1}, which shrinks it geometrically (Bengio et al. 1994;
Hochreiter 1991); the LSTM's additive cell path slows but does not stop that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class RecurrentConfig:
    cell: str = "lstm"        # rnn, lstm, gru
    vocab_size: int = 512
    d_embed: int = 64         # token embedding width (= the tied output's width)
    d_hidden: int = 128       # recurrent state width
    n_layers: int = 1
    dropout: float = 0.0      # between stacked layers (torch applies it to every layer's output but the last)

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell {self.cell!r}: use one of {', '.join(CELLS)}")


class RecurrentLM(nn.Module):
    """A causal language model on a recurrent stack: ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_embed)
        self.rnn = CELLS[config.cell](config.d_embed, config.d_hidden, num_layers=config.n_layers,
                                      batch_first=True, dropout=config.dropout if config.n_layers > 1 else 0.0)
        self.proj = nn.Linear(config.d_hidden, config.d_embed, bias=False)  # state -> embedding width
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor, state=None, *, return_state: bool = False, embeds: torch.Tensor | None = None):
        x = self.token_embedding(ids) if embeds is None else embeds  # (B, T, E)
        out, state = self.rnn(x, state)                             # (B, T, H)
        logits = self.proj(out) @ self.token_embedding.weight.T     # (B, T, V), tied output
        return (logits, state) if return_state else logits

    def num_params(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.token_embedding.weight.numel() if non_embedding else n


def recurrent_params(cell: str, d_embed: int, d_hidden: int, n_layers: int = 1) -> int:
    """Non-embedding parameters of RecurrentLM: gates x (input + hidden weights + two biases) + projection."""
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
    n = 0
    for layer in range(n_layers):
        d_in = d_embed if layer == 0 else d_hidden
        n += gates * (d_hidden * (d_in + d_hidden) + 2 * d_hidden)
    return n + d_hidden * d_embed


def hidden_for_params(cell: str, d_embed: int, target: int, n_layers: int = 1) -> int:
    """The state width whose non-embedding parameter count is closest to `target` (parameter matching)."""
    return min(range(4, 4096), key=lambda h: abs(recurrent_params(cell, d_embed, h, n_layers) - target))


# ------------------------------------------------------------------------------------------------------
# the step-by-step reference


def _cell_step(cell: str, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, w_ih, w_hh, b_ih, b_hh):
    """One time step of one layer from the equations in the module docstring. x (B, I), h and c (B, H)."""
    gi = x @ w_ih.T + b_ih   # (B, gates * H)
    gh = h @ w_hh.T + b_hh
    if cell == "rnn":
        return torch.tanh(gi + gh), None
    if cell == "lstm":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    ir, iz, in_ = gi.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1 - z) * n + z * h, None


def reference_lm_forward(model: RecurrentLM, ids: torch.Tensor) -> torch.Tensor:
    """RecurrentLM.forward one time step and one layer at a time (no dropout): logits (B, T, V)."""
    cfg = model.config
    B, T = ids.shape
    x = model.token_embedding.weight[ids]  # (B, T, E)
    for layer in range(cfg.n_layers):
        p = {k: getattr(model.rnn, f"{k}_l{layer}") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        h = x.new_zeros(B, cfg.d_hidden)
        c = x.new_zeros(B, cfg.d_hidden) if cfg.cell == "lstm" else None
        outs = []
        for t in range(T):
            h, c = _cell_step(cfg.cell, x[:, t], h, c, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
            outs.append(h)
        x = torch.stack(outs, dim=1)  # (B, T, H): the next layer's input
    return (x @ model.proj.weight.T) @ model.token_embedding.weight.T


# ------------------------------------------------------------------------------------------------------
# seq2seq with additive attention (Bahdanau, Cho & Bengio 2015, "Neural machine translation by jointly
# learning to align and translate", section 3 and appendix A)


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 64
    d_embed: int = 32
    d_hidden: int = 64     # per direction in the encoder; the decoder state
    d_attn: int = 64       # width of the additive attention's hidden layer


class Seq2Seq(nn.Module):
    """Bidirectional GRU encoder -> annotations h_j = [fwd_j; bwd_j] (B, S, 2H); GRU decoder whose state s_i
    is initialised from tanh(W_s bwd_1) (appendix A.2.2) and at each step reads [embed(y_{i-1}); c_i] with

        e_ij = v^T tanh(W_a s_{i-1} + U_a h_j),   alpha_ij = softmax_j(e_ij),   c_i = sum_j alpha_ij h_j

    and outputs logits from [s_i; c_i; embed(y_{i-1})] (a linear deep output, A.2.2 without the maxout).
    Source padding is masked out of the softmax."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        E, H, A = config.d_embed, config.d_hidden, config.d_attn
        self.src_embedding = nn.Embedding(config.vocab_size, E)
        self.tgt_embedding = nn.Embedding(config.vocab_size, E)
        self.encoder = nn.GRU(E, H, batch_first=True, bidirectional=True)
        self.init_state = nn.Linear(H, H)
        self.attn_W = nn.Linear(H, A, bias=False)      # W_a s_{i-1}
        self.attn_U = nn.Linear(2 * H, A, bias=False)  # U_a h_j: computed once per source, reused every step
        self.attn_v = nn.Linear(A, 1, bias=False)
        self.decoder = nn.GRUCell(E + 2 * H, H)
        self.out = nn.Linear(H + 2 * H + E, config.vocab_size)

    def encode(self, src: torch.Tensor):
        ann, _ = self.encoder(self.src_embedding(src))                       # (B, S, 2H)
        H = self.config.d_hidden
        s0 = torch.tanh(self.init_state(ann[:, 0, H:]))                     # backward state at j = 1
        return ann, self.attn_U(ann), s0

    def attend(self, s: torch.Tensor, ann: torch.Tensor, u_ann: torch.Tensor, src_mask: torch.Tensor | None):
        e = self.attn_v(torch.tanh(self.attn_W(s)[:, None, :] + u_ann)).squeeze(-1)  # (B, S)
        if src_mask is not None:
            e = e.masked_fill(~src_mask, float("-inf"))
        alpha = e.softmax(dim=-1)                                           # (B, S)
        return (alpha[:, :, None] * ann).sum(dim=1), alpha                  # c_i (B, 2H)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor | None = None,
                *, return_attention: bool = False):
        """Teacher forcing: src (B, S), tgt_in (B, T) = <bos> y_1 ... y_{T-1} -> logits (B, T, V)."""
        ann, u_ann, s = self.encode(src)
        emb = self.tgt_embedding(tgt_in)                                    # (B, T, E)
        logits, alphas = [], []
        for i in range(tgt_in.shape[1]):  # the decoder is sequential by construction: s_i needs s_{i-1}
            c, alpha = self.attend(s, ann, u_ann, src_mask)
            s = self.decoder(torch.cat([emb[:, i], c], dim=-1), s)
            logits.append(self.out(torch.cat([s, c, emb[:, i]], dim=-1)))
            alphas.append(alpha)
        logits = torch.stack(logits, dim=1)
        return (logits, torch.stack(alphas, dim=1)) if return_attention else logits

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, bos: int, steps: int, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        ann, u_ann, s = self.encode(src)
        y = torch.full((src.shape[0],), bos, dtype=torch.long, device=src.device)
        out = []
        for _ in range(steps):
            e = self.tgt_embedding(y)
            c, _ = self.attend(s, ann, u_ann, src_mask)
            s = self.decoder(torch.cat([e, c], dim=-1), s)
            y = self.out(torch.cat([s, c, e], dim=-1)).argmax(-1)
            out.append(y)
        return torch.stack(out, dim=1)


def reference_seq2seq_forward(model: Seq2Seq, src: torch.Tensor, tgt_in: torch.Tensor,
                              src_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seq2Seq.forward from the equations with explicit loops: the encoder's two directions step by step with
    the GRU equations, e_ij one (i, j) pair at a time, the decoder's GRU by hand. Returns (logits, alpha)."""
    m = model
    B, S = src.shape
    H = m.config.d_hidden
    x = m.src_embedding.weight[src]
    enc = m.encoder
    fwd, bwd = [None] * S, [None] * S
    h = x.new_zeros(B, H)
    for j in range(S):
        h, _ = _cell_step("gru", x[:, j], h, None, enc.weight_ih_l0, enc.weight_hh_l0, enc.bias_ih_l0, enc.bias_hh_l0)
        fwd[j] = h
    h = x.new_zeros(B, H)
    for j in reversed(range(S)):
        h, _ = _cell_step("gru", x[:, j], h, None, enc.weight_ih_l0_reverse, enc.weight_hh_l0_reverse,
                          enc.bias_ih_l0_reverse, enc.bias_hh_l0_reverse)
        bwd[j] = h
    ann = [torch.cat([fwd[j], bwd[j]], dim=-1) for j in range(S)]        # S x (B, 2H)
    s = torch.tanh(bwd[0] @ m.init_state.weight.T + m.init_state.bias)
    logits, alphas = [], []
    for i in range(tgt_in.shape[1]):
        e = torch.stack([(torch.tanh(s @ m.attn_W.weight.T + ann[j] @ m.attn_U.weight.T) @ m.attn_v.weight.T)[:, 0]
                         for j in range(S)], dim=1)                           # (B, S)
        if src_mask is not None:
            e = torch.where(src_mask, e, torch.full_like(e, -math.inf))
        alpha = torch.exp(e - e.max(dim=1, keepdim=True).values)
        alpha = alpha / alpha.sum(dim=1, keepdim=True)
        c = sum(alpha[:, j:j + 1] * ann[j] for j in range(S))
        y = m.tgt_embedding.weight[tgt_in[:, i]]
        dec = m.decoder
        s, _ = _cell_step("gru", torch.cat([y, c], dim=-1), s, None, dec.weight_ih, dec.weight_hh, dec.bias_ih,
                          dec.bias_hh)
        logits.append(torch.cat([s, c, y], dim=-1) @ m.out.weight.T + m.out.bias)
        alphas.append(alpha)
    return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
