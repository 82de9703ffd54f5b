"""The maths that PPO, GRPO, DPO and the reward model share, each a small function on tensors.

    1. batches and masks       pad prompt+response rows, find the last real token whatever the padding side
    2. log-probabilities       per-token log p(token | prefix) of a batch, entropy
    3. KL                      k1 and k3 estimators (Schulman 2020), fixed and adaptive coefficients
    4. advantages              GAE (Schulman et al. 2016), whitening, group-relative (GRPO), running moments
    5. losses                  clipped policy and value losses (PPO), Bradley-Terry over rankings, DPO

Layout of a batch of rollouts (B rows, T positions). Row i is prompt_i + response_i, then padding:

    ids           p p p p r r r e . .        (B, T)      e = <|end|>, . = pad
    attention     1 1 1 1 1 1 1 1 0 0        (B, T)
    logprob[t] = log p(ids[t+1] | ids[:t+1]) (B, T-1)    the action taken at position t is token t+1
    action mask   0 0 0 1 1 1 1 0 0          (B, T-1)    1 where token t+1 belongs to the response

Values, rewards, KL and advantages live on the same (B, T-1) grid as the log-probabilities.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from glassmind.common import GlassmindError

# ======================================================================================================
# 1. Batches and masks
# ======================================================================================================


def check_pad_eos(pad_id: int, eos_id: int) -> None:
    """Padding must not be the end token: masks are `ids != pad`, so an eos that equals pad would vanish
    from the response, and the reward would land on the token before it."""
    if pad_id == eos_id:
        raise GlassmindError(f"pad id {pad_id} equals the end-of-sequence id: give the tokenizer a separate pad "
                             "token (the chat format's <|pad|>)")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, side: str = "right",
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> ids (B, T) and attention mask (B, T), padded on `side` ("left" or "right")."""
    if side not in ("left", "right"):
        raise GlassmindError(f"padding side must be 'left' or 'right', got {side!r}")
    T = max(len(r) for r in rows) if length is None else length
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def rollout_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, eos_id: int,
                  length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt + response rows, right-padded -> ids (B, T), attention (B, T), action mask (B, T-1).

    `length` fixes T (so every minibatch of a PPO batch has one shape). A response may end with `eos_id`
    or be cut by the token limit; either way all its tokens are actions."""
    check_pad_eos(pad_id, eos_id)
    if any(len(r) == 0 for r in responses):
        raise GlassmindError("an empty response has no action to score: generate at least one token")
    ids, attn = pad_rows([list(p) + list(r) for p, r in zip(prompts, responses)], pad_id, length=length)
    actions = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        actions[i, len(p) - 1: len(p) + len(r) - 1] = 1
    return ids, attn, actions


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last 1 in each row of a 0/1 mask (B, T): the last real token, whether the row is
    padded on the left (0 0 1 1 1 -> 4) or on the right (1 1 1 0 0 -> 2)."""
    mask = mask.bool()
    if not bool(mask.any(-1).all()):
        raise GlassmindError("a row has no real token (all padding): drop empty sequences")
    T = mask.shape[-1]
    return T - 1 - mask.flip(-1).long().argmax(-1)  # argmax finds the first 1 of the flipped row


def at_last_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values (B, T) read at each row's last real token -> (B,). The reward model's score of a sequence."""
    return values.gather(-1, last_token_index(mask)[:, None]).squeeze(-1)


def place_at_last(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T): x[i] at row i's last masked position, zeros elsewhere. A sequence's reward, put on the
    action that finished it (the RM scored the token that action produced)."""
    out = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
    return out.scatter(-1, last_token_index(mask)[:, None], x[:, None])


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (advantage normalisation, as in OpenAI baselines' PPO)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) * torch.rsqrt(var + eps)) * mask.to(x.dtype)


# ======================================================================================================
# 2. Log-probabilities
# ======================================================================================================


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] (B, T, V), (B, T) -> (B, T), computed in fp32."""
    logp = logits.float().log_softmax(-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum p log p per position (B, T, V) -> (B, T)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def forward_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, *, with_entropy: bool = False,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward pass of a decoder over right-padded rows -> (hidden (B, T, C), logprob (B, T-1),
    entropy (B, T-1) or None). hidden is returned for a value head that shares the trunk.

    `temperature` T gives the log-probs of softmax(logits / T): when rollouts are sampled at temperature T,
    that tempered distribution is the policy that acted, so ratios and KL must be computed under it (as
    TRL's PPO trainer does); T = 1 is the model itself."""
    hidden = model.features(ids, attention_mask=attn)                                # (B, T, C)
    logits = model.lm_logits(hidden[:, :-1])                                         # (B, T-1, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp = gather_logprobs(logits, ids[:, 1:])
    return hidden, logp, (entropy(logits) if with_entropy else None)


def sequence_logprob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) = sum of the response's token log-probabilities (B, T-1) -> (B,)."""
    return (logp * mask.to(logp.dtype)).sum(-1)


# ======================================================================================================
# 3. KL
# ======================================================================================================


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating
    KL divergence"), with log r = log pi_ref(x) - log pi(x):

        k1 = -log r                 unbiased, can be negative on a single token, high variance
        k3 = (r - 1) - log r        unbiased and always >= 0 (r - 1 >= log r), lower variance

    Both are exactly 0 where pi == pi_ref."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise GlassmindError(f"unknown KL estimator {kind!r}: use k1 or k3")


class KLController:
    """The KL coefficient beta. Fixed when `target` is None; otherwise adapted towards a target KL per
    sequence (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2):

        e = clip(KL / target - 1, -0.2, 0.2)        proportional error, clipped
        beta <- beta * (1 + e * n / horizon)        n = sequences seen since the last update
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        if init < 0:
            raise GlassmindError(f"the KL coefficient must be >= 0, got {init}")
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target is not None and self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


# ======================================================================================================
# 4. Advantages
# ======================================================================================================


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over each row's masked actions.

        delta_t = r_t + gamma * V_{t+1} - V_t              V after the last action is 0 (the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                                 the value target

    rewards, values, mask: (B, T). Unmasked positions are skipped (the recursion carries over them) and get
    advantage and return 0. Returns (advantages, returns), both (B, T)."""
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m[:, t]
        keep = m[:, t].bool()
        next_value = torch.where(keep, values[:, t], next_value)
        next_adv = torch.where(keep, a, next_adv)
    return adv, (adv + values) * m


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): each response's reward
    standardised within its group of G responses to the same prompt. rewards (N, G) -> (N, G).

    std is the population std (unbiased=False); a group whose rewards are all equal has advantages 0 (no
    signal: nothing to prefer)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def leave_one_out(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (B,) in consecutive groups of k replies to one prompt -> each score minus the mean of the other
    k-1 of its group (RLOO, Ahmadian et al. 2024): a baseline per prompt that does not use the reply itself."""
    groups = scores.view(-1, k)
    return (groups - (groups.sum(-1, keepdim=True) - groups) / (k - 1)).view(-1)


class RunningMoments:
    """Mean and std of every value seen so far (Chan et al. 1979 parallel update), for reward normalisation:
    PPO's rewards are (score - mean) / std so that the KL coefficient means the same thing whatever scale the
    reward model's scores have (Ziegler et al. 2019 normalise the reward model the same way)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def normalise(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (x - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, d: dict) -> None:
        self.count, self.mean, self.m2 = int(d["count"]), float(d["mean"]), float(d["m2"])


# ======================================================================================================
# 5. Losses
# ======================================================================================================


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = pi(a|s) / pi_old(a|s) = exp(logp - old_logp)
        loss  = mean_t max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))

    The max of the two negatives is the pessimistic bound: a ratio that already moved past the clip range in
    the direction the advantage favours gets no more gradient. Also returns (no gradient):
    clip fraction (tokens where the clipped term is the one used) and approx-KL, the k3 estimate of
    KL(pi_old || pi) from the old policy's samples: mean((ratio - 1) - log ratio)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask)),
                 "ratio": float(masked_mean(ratio, mask))}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (as in OpenAI baselines' PPO2 and Ziegler et al.'s lm-human-preferences):

        V_clip = V_old + clip(V - V_old, -eps, eps)
        loss   = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    so one batch cannot drag the value function far from where it was when the batch was collected."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped, clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": float(masked_mean((clipped > unclipped).float(), mask))}
    return loss, stats


def ranking_pairs(ranks: Sequence[int]) -> list[tuple[int, int, float]]:
    """The pairs a K-way ranking implies, as (i, j, weight) meaning "i beats j" with that weight.

    A strict pair (ranks[i] < ranks[j]) is one win for i: (i, j, 1). A tie (ranks[i] == ranks[j]) is half a
    win each way: (i, j, 0.5) and (j, i, 0.5), whose loss is minimal when the two scores are equal (the
    Bradley-Terry likelihood of a draw scored 1/2 : 1/2, as in chess ratings). K responses give K(K-1)/2
    comparisons (InstructGPT, Ouyang et al. 2022, eq. 1, uses every one of them)."""
    out = []
    K = len(ranks)
    for i in range(K):
        for j in range(i + 1, K):
            if ranks[i] < ranks[j]:
                out.append((i, j, 1.0))
            elif ranks[j] < ranks[i]:
                out.append((j, i, 1.0))
            else:
                out += [(i, j, 0.5), (j, i, 0.5)]
    return out


def bradley_terry_loss(scores: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Negative log-likelihood of one K-way ranking under Bradley-Terry, P(i beats j) = sigmoid(s_i - s_j):
    the sum over the ranking's pairs of -weight * log sigmoid(s_i - s_j). scores: (K,) -> scalar."""
    pairs = ranking_pairs(ranks)
    if not pairs:
        return scores.sum() * 0.0
    i, j, w = (torch.tensor(c) for c in zip(*pairs))
    return -(w.to(scores.dtype) * F.logsigmoid(scores[i] - scores[j])).sum()


def pairwise_accuracy(scores: torch.Tensor, ranks: Sequence[int]) -> tuple[float, int]:
    """(correctly ordered strict pairs, number of strict pairs); equal scores count half."""
    right, n = 0.0, 0
    for i, j, w in ranking_pairs(ranks):
        if w == 1.0:
            n += 1
            d = float(scores[i] - scores[j])
            right += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return right, n


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7), inputs are sequence log-probs (N,):

        implicit reward  r(y) = beta * (log pi(y|x) - log pi_ref(y|x))
        loss             = -mean log sigmoid(r(chosen) - r(rejected))

    Returns (loss, margin r(chosen) - r(rejected) per pair, detached)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach()
