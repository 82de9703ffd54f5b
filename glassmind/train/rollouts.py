"""Rollouts for the RL recipes (ppo, grpo): prompts of a step, replies sampled through the inference engine,
the batch they make, and its log-probabilities and values without gradient.

Every draw is a pure function of (seed, step), so a step re-run after a resume samples the same replies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from glassmind.common import GlassmindError, config_field
from glassmind.data import tasks as task_lib
from glassmind.model.heads import ScalarHead
from glassmind.tokenizer.chat import ChatFormat
from glassmind.train import losses as rl
from glassmind.train.chat_runs import generate
from glassmind.train.run import RunSettings


@dataclass
class RLSettings(RunSettings):
    """What the RL verbs (ppo, grpo) share besides the run settings: where prompts and rewards come from, how
    replies are sampled, the clipped update's dials and the held-out evaluation. A verb's config extends it."""

    policy: str = config_field("", "the SFT run: the starting policy and the frozen reference")
    reward: str = config_field("", "a reward-model run (glassmind reward), or 'verifier' for 1/0 from the "
                                   "built-in tasks' verifier")
    prompts: Optional[str] = config_field(None, "JSONL of {\"prompt\": text or messages} (default: built-in "
                                                "task prompts; --reward verifier needs those)")
    tasks: list[str] = config_field(list(task_lib.TASKS), "built-in tasks whose prompts are used")
    world_seed: int = config_field(0, "seed of the built-in fictional world")
    steps: int = config_field(40, "RL steps (each: rollouts, scoring, updates)")
    max_new_tokens: int = config_field(12, "longest reply")
    temperature: float = config_field(1.0, "sampling temperature of the rollouts (1 = the policy itself)")
    minibatch: int = config_field(16, "replies per gradient step")
    lr: float = config_field(3e-5, "learning rate (after warmup; constant)")
    warmup_steps: int = config_field(2, "linear warmup, in steps")
    clip: float = config_field(0.2, "policy ratio clip epsilon")
    grad_clip: float = config_field(1.0, "clip the global gradient norm (0: off)")
    seed: int = config_field(0, "seed for prompts, sampling and minibatch order")
    eval_every: int = config_field(1, "held-out accuracy every N steps (and at the end)")
    eval_per_task: int = config_field(10, "held-out prompts per task in each evaluation")
    final_eval_per_task: int = config_field(50, "held-out prompts per task in the final evaluation")
    ckpt_every: int = config_field(10, "checkpoint every N steps (and at the end)")


class PolicyWithValue(nn.Module):
    """The policy and its value head, as one module so the train-state checkpoint holds both."""

    def __init__(self, policy: nn.Module, value_head: nn.Module | None):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    @property
    def config(self):
        return self.policy.config


def zero_value_head(d_model: int) -> ScalarHead:
    head = ScalarHead(d_model)
    nn.init.zeros_(head.proj.weight)
    return head


def read_prompts(path: str) -> list[list[dict]]:
    """Prompts from JSONL lines {"prompt": text or messages} (preference files work too: their prompts)."""
    out = [task_lib._prompt(obj.get("prompt"), f"{path}:{n}") for n, obj in task_lib._lines(path)]
    if not out:
        raise GlassmindError(f"{path} holds no prompts")
    return out


def step_prompts(cfg, step: int, n: int, user: list[list[dict]] | None) -> tuple[list[list[dict]], list]:
    """The prompts of one step (a pure function of seed and step) and their examples (None for user prompts)."""
    if user is not None:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(user), (n,), generator=g).tolist()
        return [user[i] for i in idx], [None] * n
    examples = task_lib.train_examples(n, cfg.seed * 1_000_003 + step, cfg.tasks, cfg.world_seed, "rl")
    return [e.messages()[:1] for e in examples], examples


def sample_seed(seed: int, step: int) -> int:
    """The engine seeds reply i with this + i: distinct per step, the same when a step is re-run on resume."""
    return (seed * 1_000_003 + step) * 100_003


@dataclass
class Rollouts:
    ids: torch.Tensor        # (B, T) prompt + reply, right-padded
    attn: torch.Tensor       # (B, T)
    actions: torch.Tensor    # (B, T-1) 1 where logprob[t] scores a reply token
    replies: list[str]
    examples: list           # task_lib.Example or None per row
    lengths: torch.Tensor    # (B,) reply tokens
    ended: torch.Tensor      # (B,) bool: the reply closed with <|end|> (False: cut by the token limit)


def rollout(model: nn.Module, fmt: ChatFormat, messages: Sequence[list[dict]], examples: list, *, max_new_tokens: int,
            temperature: float, seed: int) -> Rollouts:
    prompts = [fmt.render_prompt(m) for m in messages]
    replies = generate(model, prompts, fmt.end_id, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    ids, attn, actions = rl.rollout_batch(prompts, replies, fmt.pad_id, fmt.end_id)
    return Rollouts(ids, attn, actions, [fmt.parse_reply(r) for r in replies], list(examples),
                    torch.tensor([len(r) for r in replies], dtype=torch.float32),
                    torch.tensor([fmt.end_id in r for r in replies], dtype=torch.bool))


def verifier_accuracy(r: Rollouts) -> float | None:
    pairs = [(e, rep) for e, rep in zip(r.examples, r.replies) if e is not None]
    return sum(task_lib.verify(e, rep) for e, rep in pairs) / len(pairs) if pairs else None


def minibatch_order(seed: int, step: int, epoch: int, n: int, size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + epoch)
    return list(torch.randperm(n, generator=g).split(size))


def policy_forward(model: PolicyWithValue, ids: torch.Tensor, attn: torch.Tensor, *, with_entropy: bool = False,
                   temperature: float = 1.0, value_only: bool = False):
    """(logprob (b, T-1), values (b, T-1) or None, entropy or None) in one pass over the shared trunk. The
    value at position t is V(prefix up to token t), the state in which action t (token t+1) is taken."""
    hidden, logp, ent = rl.forward_logprobs(model.policy, ids, attn, with_entropy=with_entropy,
                                            temperature=temperature)
    if value_only:  # value warmup: the value loss may move the head only, not the policy's trunk
        hidden = hidden.detach()
    values = model.value_head(hidden[:, :-1]) if model.value_head is not None else None
    return logp, values, ent


@torch.no_grad()
def score_batch(model: PolicyWithValue, ref: nn.Module, r: Rollouts, order: Sequence[torch.Tensor], *,
                temperature: float = 1.0):
    """old logprob, values, entropy, reference logprob (each (B, T-1)), computed minibatch by minibatch in
    `order` (epoch 0's), so the first update sees bit-identical log-probs: ratio exactly 1."""
    B, T1 = r.actions.shape
    old_logp, ref_logp, ent = torch.zeros(B, T1), torch.zeros(B, T1), torch.zeros(B, T1)
    values = torch.zeros(B, T1)
    for idx in order:
        lp, v, e = policy_forward(model, r.ids[idx], r.attn[idx], with_entropy=True, temperature=temperature)
        old_logp[idx], ent[idx] = lp, e
        if v is not None:
            values[idx] = v.float()  # bf16 under --dtype bf16's autocast; kept in fp32 like the log-probs
        ref_logp[idx] = rl.forward_logprobs(ref, r.ids[idx], r.attn[idx], temperature=temperature)[1]
    return old_logp, values, ent, ref_logp


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def plot_rl(rows: list[dict], path: Path, *, title: str) -> None:
    """Reward, KL and held-out accuracy against the step: the three curves that say whether RL helped."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glassmind.common import atomic_write_bytes

    rows = [r for r in rows if "reward" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=100)
    for ax, key, label in zip(axes, ("reward", "kl", "heldout_acc"),
                              ("mean RM score", "KL(policy || reference) per reply", "held-out accuracy")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def rl_summary(out: Path, step: int, rows: list[dict], first: dict | None, final: dict) -> dict:
    """The key numbers of an RL run (ppo, grpo): held-out accuracy before and after (the verifier's), and the
    reward and KL of the first step and of the last quarter of the run (less noisy than the last step)."""
    steps = [r for r in rows if "reward" in r]
    first = first or next((r for r in rows if r.get("split") == "heldout"), {})
    tail = steps[-max(1, len(steps) // 4):]
    return {"run": str(out), "steps": step, "heldout_acc_start": first.get("heldout_acc"),
            "heldout_acc": final["accuracy"], **{f"acc_{t}": a for t, a in final["per_task"].items()},
            "reward_first": steps[0]["reward"] if steps else None,
            "reward_last_quarter": sum(r["reward"] for r in tail) / len(tail) if tail else None,
            "kl_last_quarter": sum(r["kl"] for r in tail) / len(tail) if tail else None}
