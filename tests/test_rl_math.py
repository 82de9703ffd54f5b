"""The shared RL maths (glassmind/train/rl.py) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glassmind.common import GlassmindError
from glassmind.model import ModelConfig, Transformer
from glassmind.model.heads import ScalarHead
from glassmind.train import losses as rl


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------------ GAE


def test_gae_by_hand_gamma1():
    # rewards r = [0, 0, 1], values V = [0.5, 0.4, 0.6], gamma = 1, lambda = 0.9; V after the end is 0.
    #   t=2: delta = 1 + 1*0   - 0.6 =  0.4        A2 = 0.4
    #   t=1: delta = 0 + 1*0.6 - 0.4 =  0.2        A1 = 0.2 + 0.9 * 0.4  = 0.56
    #   t=0: delta = 0 + 1*0.4 - 0.5 = -0.1        A0 = -0.1 + 0.9 * 0.56 = 0.404
    #   returns = A + V = [0.904, 0.96, 1.0]
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.4, 0.6]])
    adv, ret = rl.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=0.9)
    assert close(adv, [[0.404, 0.56, 0.4]])
    assert close(ret, [[0.904, 0.96, 1.0]])


def test_gae_by_hand_discounted_with_padding():
    # gamma = 0.9, lambda = 0.5 (gamma * lambda = 0.45), same r and V, inside a padded row:
    #   t=2: delta = 1 - 0.6                 =  0.4    A2 = 0.4
    #   t=1: delta = 0 + 0.9*0.6 - 0.4       =  0.14   A1 = 0.14 + 0.45 * 0.4  = 0.32
    #   t=0: delta = 0 + 0.9*0.4 - 0.5       = -0.14   A0 = -0.14 + 0.45 * 0.32 = 0.004
    # Row layout: one prompt position before (mask 0) and two padding positions after (mask 0): their
    # values (9.0) must not leak into the recursion, and they get advantage 0.
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    v = torch.tensor([[9.0, 0.5, 0.4, 0.6, 9.0, 9.0]])
    m = torch.tensor([[0, 1, 1, 1, 0, 0]])
    adv, ret = rl.gae(r, v, m, gamma=0.9, lam=0.5)
    assert close(adv, [[0, 0.004, 0.32, 0.4, 0, 0]])
    assert close(ret, [[0, 0.504, 0.72, 1.0, 0, 0]])


def test_gae_lambda1_is_monte_carlo_return_minus_value():
    # lambda = 1, gamma = 1: A_t = (sum of future rewards) - V_t
    r = torch.tensor([[0.1, -0.2, 1.5]])
    v = torch.tensor([[0.3, 0.7, -0.4]])
    adv, ret = rl.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert close(ret, [[1.4, 1.3, 1.5]])
    assert close(adv, [[1.1, 0.6, 1.9]])


# ------------------------------------------------------------------------------------------ PPO losses


def test_clipped_policy_loss_by_hand():
    # eps = 0.2; ratios [1.5, 0.5, 1.1], advantages [+1, +1, -1]
    #   token 0: -A*ratio = -1.5, -A*clip(1.5) = -1.2 -> max = -1.2  (clipped: no gradient)
    #   token 1: -0.5, -A*clip(0.5)=-0.8          -> max = -0.5  (a ratio below 1-eps with A > 0 is NOT
    #            clipped: the pessimistic bound keeps the gradient that raises it)
    #   token 2: -(-1)*1.1 = 1.1, clip(1.1)=1.1    -> 1.1
    #   loss = (-1.2 - 0.5 + 1.1) / 3 = -0.2; clip fraction 1/3
    #   approx-KL = mean((ratio - 1) - ln ratio)
    #             = ((0.5 - ln 1.5) + (-0.5 - ln 0.5) + (0.1 - ln 1.1)) / 3
    #             = (0.0945349 + 0.1931472 + 0.0046898) / 3 = 0.0974573
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = rl.ppo_policy_loss(logp, old, adv, torch.ones(1, 3), clip=0.2)
    assert close(loss, -0.2)
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    assert stats["approx_kl"] == pytest.approx(0.0974573, abs=1e-6)
    # d loss / d logp_t = -A_t * ratio_t / 3 where unclipped, 0 where clipped
    loss.backward()
    assert close(logp.grad, [[0.0, -0.5 / 3, 1.1 / 3]])


def test_clipped_policy_loss_ignores_masked_tokens():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 100.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    loss, _ = rl.ppo_policy_loss(logp, old, adv, torch.tensor([[1, 1, 1, 0]]), clip=0.2)
    assert close(loss, -0.2)


def test_clipped_value_loss_by_hand():
    # eps = 0.2; V_old = [0, 0], V = [1.0, 0.1], returns R = [0.5, 1.0]
    #   token 0: (V-R)^2 = 0.25; V_clip = 0 + clip(1.0) = 0.2, (0.2-0.5)^2 = 0.09 -> max 0.25
    #   token 1: (0.1-1)^2 = 0.81; V_clip = 0.1 (inside the range) -> 0.81
    #   loss = 0.5 * (0.25 + 0.81) / 2 = 0.265
    loss, _ = rl.ppo_value_loss(torch.tensor([[1.0, 0.1]]), torch.zeros(1, 2), torch.tensor([[0.5, 1.0]]),
                                torch.ones(1, 2), clip=0.2)
    assert close(loss, 0.265)
    # V = -1 with R = 0.5: unclipped 2.25, V_clip = -0.2 -> 0.49; max = 2.25 (the clip never lowers the loss)
    # V = 0.5 with R = 1.0: unclipped 0.25, V_clip = 0.2 -> 0.64;  max = 0.64 (clipped: the step is capped)
    loss, stats = rl.ppo_value_loss(torch.tensor([[-1.0, 0.5]]), torch.zeros(1, 2), torch.tensor([[0.5, 1.0]]),
                                    torch.ones(1, 2), clip=0.2)
    assert close(loss, 0.5 * (2.25 + 0.64) / 2)
    assert stats["vf_clipfrac"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ KL


def test_kl_estimators_by_hand():
    # log pi = ln 0.5, log pi_ref = ln 0.25 -> log r = ln(0.25/0.5) = -ln 2
    #   k1 = -log r = ln 2 = 0.6931472
    #   k3 = (r - 1) - log r = (0.5 - 1) + ln 2 = 0.1931472
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert close(rl.kl_estimate(logp, ref, "k1"), [math.log(2)])
    assert close(rl.kl_estimate(logp, ref, "k3"), [math.log(2) - 0.5])
    # both are exactly 0 where the policies agree
    same = torch.randn(5)
    assert torch.equal(rl.kl_estimate(same, same.clone(), "k1"), torch.zeros(5))
    assert torch.equal(rl.kl_estimate(same, same.clone(), "k3"), torch.zeros(5))
    with pytest.raises(GlassmindError):
        rl.kl_estimate(same, same, "k2")


def test_kl_estimators_are_unbiased_on_average():
    # sampling x ~ p, mean k1 and mean k3 both estimate KL(p || q) exactly computed
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True)
    for kind in ("k1", "k3"):
        est = float(rl.kl_estimate(p.log()[x], q.log()[x], kind).mean())
        assert est == pytest.approx(true_kl, abs=0.01)


def test_adaptive_kl_controller_by_hand():
    # beta = 0.1, target 6, observed KL 9: error = clip(9/6 - 1, -0.2, 0.2) = 0.2
    #   beta <- 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512 = 0.100512
    c = rl.KLController(0.1, target=6.0, horizon=10000)
    assert c.update(9.0, 256) == pytest.approx(0.100512)
    # KL 3 (half the target): error = clip(-0.5) = -0.2 -> beta * (1 - 0.00512)
    assert c.update(3.0, 256) == pytest.approx(0.100512 * (1 - 0.00512))
    fixed = rl.KLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05


# ------------------------------------------------------------------------------------------ masks


def test_last_token_index_either_padding_side():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert rl.last_token_index(right).tolist() == [2, 4]
    assert rl.last_token_index(left).tolist() == [4, 4]
    with pytest.raises(GlassmindError):
        rl.last_token_index(torch.tensor([[0, 0]]))


def test_reward_lands_on_last_real_token_left_and_right_padding():
    """A reward model scoring the same sequences padded left and padded right gives the same rewards, read at
    the last non-pad token; place_at_last puts them on the action that produced that token."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=16, d_model=32, n_heads=4, n_layers=2)
    trunk, head = Transformer(cfg).eval(), ScalarHead(32)
    pad = 49
    rows = [[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15]]
    scores = {}
    for side in ("left", "right"):
        ids, mask = rl.pad_rows(rows, pad, side=side)
        assert torch.equal(mask, (ids != pad).long())
        with torch.no_grad():
            per_pos = head(trunk.features(ids, attention_mask=mask))               # (B, T)
        scores[side] = rl.at_last_token(per_pos, mask)
        # the hand-picked index: last real token of each row
        want = [5, 2, 3] if side == "right" else [5, 5, 5]
        assert torch.equal(scores[side], per_pos[torch.arange(3), torch.tensor(want)])
    assert torch.allclose(scores["left"], scores["right"], atol=1e-5)
    # each row scored alone, unpadded: the same number
    for i, r in enumerate(rows):
        with torch.no_grad():
            alone = head(trunk.features(torch.tensor([r])))[0, -1]
        assert torch.allclose(alone, scores["right"][i], atol=1e-5)
    placed = rl.place_at_last(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1]]))
    assert placed.tolist() == [[0, 1, 0], [2, 0, 0], [0, 0, 3]]


def test_rollout_batch_layout_and_pad_eos_check():
    ids, attn, act = rl.rollout_batch([[1, 2, 3], [4]], [[7, 8, 9], [5, 9]], pad_id=0, eos_id=9)
    assert ids.tolist() == [[1, 2, 3, 7, 8, 9], [4, 5, 9, 0, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    # logprob[t] scores token t+1: the responses' tokens are t+1 in {3,4,5} and {1,2}
    assert act.tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]
    with pytest.raises(GlassmindError, match="pad id"):
        rl.rollout_batch([[1]], [[9]], pad_id=9, eos_id=9)
    with pytest.raises(GlassmindError):
        rl.check_pad_eos(3, 3)


def test_forward_logprobs_match_log_softmax():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, context_length=16, d_model=16, n_heads=2, n_layers=1)
    m = Transformer(cfg).eval()
    ids = torch.randint(0, 30, (2, 7))
    attn = torch.ones_like(ids)
    _, logp, ent = rl.forward_logprobs(m, ids, attn, with_entropy=True)
    full = F.log_softmax(m(ids).double(), -1)
    assert torch.allclose(logp.double(), full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(ent.double(), -(full.exp() * full).sum(-1)[:, :-1], atol=1e-5)
    # at temperature T the policy that sampled is softmax(logits / T): its log-probs and entropy
    _, logp_t, ent_t = rl.forward_logprobs(m, ids, attn, with_entropy=True, temperature=0.5)
    tempered = F.log_softmax(m(ids).double() / 0.5, -1)
    assert torch.allclose(logp_t.double(), tempered[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(ent_t.double(), -(tempered.exp() * tempered).sum(-1)[:, :-1], atol=1e-5)


# ------------------------------------------------------------------------------------------ normalisation


def test_whiten_and_running_moments():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = rl.masked_whiten(x, m)
    # mean 2, population var 2/3 -> (x - 2) / sqrt(2/3) on the mask, 0 off it
    assert close(w, [[-1 / math.sqrt(2 / 3), 0.0, 1 / math.sqrt(2 / 3), 0.0]], tol=1e-5)
    rm = rl.RunningMoments()
    data = torch.randn(100, dtype=torch.float64) * 3 + 2
    for chunk in data.split(7):
        rm.update(chunk)
    assert rm.mean == pytest.approx(float(data.mean()))
    assert rm.std == pytest.approx(float(data.std(unbiased=False)))
    again = rl.RunningMoments()
    again.load_state_dict(rm.state_dict())
    assert again.std == rm.std


def test_group_advantages_by_hand():
    # group [1, 0, 0, 1]: mean 0.5, population std 0.5 -> [1, -1, -1, 1]; an all-equal group -> zeros
    a = rl.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    assert close(a, [[1, -1, -1, 1], [0, 0, 0, 0]], tol=1e-4)


# ------------------------------------------------------------------------------------------ Bradley-Terry


def pair_loss(si, sj):
    return -F.logsigmoid(si - sj)


def test_bradley_terry_k_way_equals_sum_over_pairs():
    torch.manual_seed(0)
    s = torch.randn(4, dtype=torch.float64)
    ranks = [2, 0, 3, 1]  # best to worst: 1, 3, 0, 2
    pairs = [(1, 3), (1, 0), (1, 2), (3, 0), (3, 2), (0, 2)]  # every (better, worse), K(K-1)/2 = 6
    want = sum(pair_loss(s[i], s[j]) for i, j in pairs)
    assert torch.allclose(rl.bradley_terry_loss(s, ranks), want)
    assert sorted((i, j) for i, j, _ in rl.ranking_pairs(ranks)) == sorted(pairs)


def test_bradley_terry_ties_are_half_a_win_each_way():
    s = torch.tensor([0.3, -0.2, 1.1], dtype=torch.float64, requires_grad=True)
    ranks = [0, 1, 1]  # 0 beats both; 1 and 2 tie
    want = (pair_loss(s[0], s[1]) + pair_loss(s[0], s[2])
            + 0.5 * pair_loss(s[1], s[2]) + 0.5 * pair_loss(s[2], s[1]))
    got = rl.bradley_terry_loss(s, ranks)
    assert torch.allclose(got, want)
    # the tie term alone is minimised (value ln 2, gradient 0) when the tied scores are equal
    t = torch.tensor([0.7, 0.7], dtype=torch.float64, requires_grad=True)
    tie = rl.bradley_terry_loss(t, [1, 1])
    tie.backward()
    assert float(tie.detach()) == pytest.approx(math.log(2))
    assert torch.allclose(t.grad, torch.zeros(2, dtype=torch.float64))
    # all tied: no strict pair to be right about; accuracy counts strict pairs only
    assert rl.pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), [0, 1, 1]) == (1.0, 2)


def test_dpo_loss_by_hand():
    # beta 0.1; chosen: pi -1, ref -2 (log-ratio +1); rejected: pi -3, ref -2 (log-ratio -1)
    #   margin = 0.1 * (1 - (-1)) = 0.2;  loss = -ln sigmoid(0.2) = ln(1 + e^-0.2) = 0.5981389
    loss, margin = rl.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                               torch.tensor([-2.0]), beta=0.1)
    assert float(margin) == pytest.approx(0.2)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    # policy == reference: margin 0, loss ln 2
    loss, _ = rl.dpo_loss(*(torch.tensor([-1.5]),) * 4)
    assert float(loss) == pytest.approx(math.log(2))


def test_leave_one_out_baseline_by_hand():
    scores = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 10.0])
    # group (1, 2, 6): 1 - 4, 2 - 3.5, 6 - 1.5; a group that all scored the same gets 0
    assert torch.allclose(rl.leave_one_out(scores, 3), torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    assert torch.equal(rl.leave_one_out(torch.tensor([3.0, 5.0]), 2), torch.tensor([-2.0, 2.0]))
