"""The reward model as a noun: the SFT transformer's trunk + a scalar head (and optionally the trunk's own
log-likelihood of the reply), how a run directory holds it, and how it scores rankings. The `reward` recipe
trains it; ppo, grpo and the alignment study read it with `load_reward_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from glassmind.common import GlassmindError, atomic_path
from glassmind.data import tasks as task_lib
from glassmind.model import save_model
from glassmind.model.heads import ScalarHead
from glassmind.tokenizer.chat import ChatFormat
from glassmind.train import losses as rl
from glassmind.train.chat_runs import require_dir


HEAD_FILE = "reward_head.safetensors"


SCORES = ("head", "head+loglik")


class RewardModel(nn.Module):
    """The transformer trunk and a scalar head: (ids (B, T), attention (B, T)) -> scores (B,), read at each
    row's last real token whatever side the padding is on.

    With `reply_start_id` (score "head+loglik") the score also adds the trunk's own log-likelihood of the reply:
    the sum, over the tokens after the last `reply_start_id` (the assistant role token), of log p(token | prefix)
    from the trunk's LM head. A head on the last token must learn from rankings alone whether the letters of a
    reply are right, and a model as small as the demo's does not (it puts a correct reply above a wrong one
    0.74-0.76 of the time on the policy's held-out samples). The likelihood is what the SFT model already
    knows about right answers: untrained, it ranks those samples 0.80 (0.88 for a larger SFT model), and the
    head adds what the rankings say beyond it (format, length)."""

    def __init__(self, trunk: nn.Module, *, reply_start_id: int | None = None):
        super().__init__()
        self.trunk = trunk
        self.head = ScalarHead(trunk.config.d_model)
        self.reply_start_id = reply_start_id

    @property
    def config(self):
        return self.trunk.config

    @property
    def score_kind(self) -> str:
        return "head" if self.reply_start_id is None else "head+loglik"

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk.features(ids, attention_mask=attn)                          # (B, T, C)
        score = rl.at_last_token(self.head(hidden), attn)                               # (B,)
        if self.reply_start_id is None:
            return score
        logits = self.trunk.lm_logits(hidden[:, :-1]).float()                           # predicts tokens 1..T-1
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)   # (B, T-1)
        pos = torch.arange(ids.shape[1], device=ids.device)
        start = torch.where(ids == self.reply_start_id, pos, torch.full_like(pos, -1)).max(-1).values  # (B,)
        reply = (pos[1:][None, :] > start[:, None]) & (start[:, None] >= 0) & attn[:, 1:].bool()
        return score + (logp * reply).sum(-1)

    def save(self, run_dir: str | Path) -> None:
        from safetensors.torch import save_file

        save_model(self.trunk, run_dir)
        meta = {"score": self.score_kind}
        if self.reply_start_id is not None:
            meta["reply_start_id"] = str(self.reply_start_id)
        with atomic_path(Path(run_dir) / HEAD_FILE) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(tmp),
                      metadata=meta)


def load_reward_model(run_dir: str | Path) -> RewardModel:
    from safetensors.torch import load_file

    from glassmind.model import load_model

    run_dir = require_dir(str(run_dir), "--reward")
    if not (run_dir / HEAD_FILE).exists():
        raise GlassmindError(f"{run_dir} has no {HEAD_FILE}: it is not a reward model; train one with "
                             "`glassmind reward --from SFT_RUN`")
    from safetensors import safe_open

    with safe_open(str(run_dir / HEAD_FILE), "pt") as f:
        meta = f.metadata() or {}
    start = meta.get("reply_start_id")  # absent: a head-only reward model (also every run made before)
    rm = RewardModel(load_model(run_dir), reply_start_id=int(start) if start is not None else None)
    rm.head.load_state_dict(load_file(str(run_dir / HEAD_FILE)))
    return rm.eval()


def render_preference(fmt: ChatFormat, p: task_lib.Preference, context: int) -> list[list[int]]:
    """The K sequences prompt + reply + <|end|>, each cut to the context (keeping its end: the score is read
    at the last token, so the reply's end must be there)."""
    prompt = fmt.render_prompt(p.prompt)
    return [(prompt + fmt.render_reply(r))[-context:] for r in p.responses]


def score_rankings(rm: RewardModel, fmt: ChatFormat, prefs: Sequence[task_lib.Preference], *,
                   context: int | None = None, length: int | None = None) -> list[torch.Tensor]:
    """Scores (K,) of every ranking's replies, one forward pass over all of them (right-padded to `length`,
    default the longest). `context` is the model's (give it when `rm` is a wrapper without .config)."""
    seqs = [render_preference(fmt, p, context or rm.config.context_length) for p in prefs]
    ids, attn = rl.pad_rows([s for group in seqs for s in group], fmt.pad_id, length=length)
    scores = rm(ids, attn)
    return list(scores.split([len(g) for g in seqs]))


def ranking_loss(scores: Sequence[torch.Tensor], prefs: Sequence[task_lib.Preference], *,
                 weight: float | None = None) -> torch.Tensor:
    """Sum over the batch's rankings of their Bradley-Terry losses, divided by the total pair weight: the mean
    loss per comparison (a 5-way ranking counts as its 10 comparisons). `weight` replaces that total (a
    data-parallel replica passes the global batch's weight / replicas)."""
    total = sum(rl.bradley_terry_loss(s, p.ranks) for s, p in zip(scores, prefs))
    return total / (max(pair_weight(prefs), 1.0) if weight is None else weight)


def pair_weight(prefs: Sequence[task_lib.Preference]) -> float:
    return sum(w for p in prefs for _, _, w in rl.ranking_pairs(p.ranks))


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, fmt: ChatFormat, prefs: Sequence[task_lib.Preference],
                      batch_size: int = 32) -> dict:
    """Fraction of strict held-out pairs the model orders right; on built-in data also the accuracy on the
    pair that needs the answer checked: the correct reply against a near miss (same format, wrong value)."""
    right = n = 0.0
    hard_right = hard_n = 0.0
    for start in range(0, len(prefs), batch_size):
        chunk = prefs[start:start + batch_size]
        for s, p in zip(score_rankings(rm, fmt, chunk), chunk):
            r, k = rl.pairwise_accuracy(s, p.ranks)
            right, n = right + r, n + k
            for i, j, w in rl.ranking_pairs(p.ranks):
                if w == 1.0 and p.ranks[i] == 0 and p.ranks[j] == 1:
                    d = float(s[i] - s[j])
                    hard_right += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
                    hard_n += 1
    out = {"pairwise_acc": right / n if n else float("nan"), "pairs": int(n)}
    if hard_n and all(p.example is not None for p in prefs):
        out["acc_correct_vs_near_miss"] = hard_right / hard_n
    return out
