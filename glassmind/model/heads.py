"""Heads: what sits on the Transformer's final hidden states (B, T, C).

The causal LM head (the output projection) lives in the model file itself, since it is tied to the token
embedding; these are the encoder's heads (Devlin et al. 2019, sec. 3 and fig. 4) and the scalar head that
reward and value models put on any family.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MaskedLMHead(nn.Module):
    """BERT's MLM head: a dense layer, the activation and a norm ("transform"), then the projection to the
    vocabulary, tied to the token embedding, with its own bias. (B, T, C) -> (B, T, V)."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.activation = cfg.activation if cfg.activation in ("relu", "gelu", "gelu_tanh", "silu") else "gelu"
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.norm == "layernorm" else nn.RMSNorm(
            cfg.d_model, eps=cfg.norm_eps)
        self.decoder = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, tied_weight: torch.Tensor) -> torch.Tensor:
        h = self.dense(hidden)
        h = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu,
             "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[self.activation](h)
        h = self.norm(h)
        weight = self.decoder.weight if self.decoder is not None else tied_weight
        return F.linear(h, weight, self.bias)                                       # (B, T, V)


class SequenceClassificationHead(nn.Module):
    """BERT's pooler (dense + tanh on the first token, [CLS]) then a linear classifier. -> (B, num_labels)."""

    def __init__(self, cfg):
        super().__init__()
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)

    def forward(self, hidden: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(hidden[:, 0]))                               # (B, C)
        return self.classifier(self.dropout(pooled))                                # (B, num_labels)


class TokenClassificationHead(nn.Module):
    """A label per token (tagging). (B, T, C) -> (B, T, num_labels)."""

    def __init__(self, cfg):
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)

    def forward(self, hidden: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


class ScalarHead(nn.Module):
    """One number per position (B, T, C) -> (B, T): a reward model's score or a value function's V(s)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (d_model + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)


def make_head(cfg, token_embedding: nn.Embedding) -> nn.Module | None:
    if cfg.head == "mlm":
        return MaskedLMHead(cfg)
    if cfg.head == "classification":
        return SequenceClassificationHead(cfg)
    if cfg.head == "token_classification":
        return TokenClassificationHead(cfg)
    return None  # "lm" (in the model file) or "none"
