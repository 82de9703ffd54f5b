"""Logits processors (definitions, property tests, pinned to transformers' warpers) and the settings'
validation."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from glassmind.common import GlassmindError
from glassmind.infer.sampling import (SamplingParams, apply_repetition_penalty, make_generators, min_p_filter,
                                      process, sample, stop_length, top_k_filter, top_p_filter)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=40)
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run best on one thread


def kept(x: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(x)).flatten().tolist())


# ------------------------------------------------------------------------------------------ top-p


@fast
@given(logit_rows, st.floats(0.001, 1.0))
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(row, p):
    logits = torch.tensor([row])
    probs = torch.tensor(row, dtype=torch.float64).softmax(-1).numpy()
    keep = kept(top_p_filter(logits, p)[0])
    drop = set(range(len(row))) - keep
    mass = probs[list(keep)].sum()
    smallest = min(probs[list(keep)])
    # away from float ties at the boundary the set is well defined
    assume(abs(mass - p) > 1e-9 and abs(mass - smallest - p) > 1e-9)
    assert keep, "at least one token survives"
    if p < 1.0:
        assert mass >= p, "the kept mass reaches p"
        assert len(keep) == 1 or mass - smallest < p, "no smaller set reaches p (dropping the least likely)"
    assert all(probs[k] >= probs[d] for k in keep for d in drop), "the kept tokens are the most likely"


def test_top_p_hand_example_and_off():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    assert kept(top_p_filter(logits, 0.5)[0]) == {0}          # 0.5 reaches 0.5
    assert kept(top_p_filter(logits, 0.51)[0]) == {0, 1}
    assert kept(top_p_filter(logits, 0.9)[0]) == {0, 1, 2}    # 0.95 >= 0.9
    assert torch.equal(top_p_filter(logits, 1.0), logits)


# ------------------------------------------------------------------------------------------ top-k


@fast
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=30), st.integers(1, 40))
def test_top_k_keeps_exactly_k_even_with_ties(row, k):
    logits = torch.tensor([row], dtype=torch.float32)  # small integers: many ties
    keep = kept(top_k_filter(logits, k)[0])
    assert len(keep) == min(k, len(row))
    drop = set(range(len(row))) - keep
    assert all(row[a] >= row[b] for a in keep for b in drop)


def test_top_k_zero_is_off():
    x = torch.randn(2, 10)
    assert torch.equal(top_k_filter(x, 0), x)


# ------------------------------------------------------------------------------------------ min-p


@fast
@given(logit_rows, st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability(row, min_p):
    probs = torch.tensor(row, dtype=torch.float64).softmax(-1)
    threshold = min_p * probs.max().item()
    assume(all(abs(q - threshold) > 1e-6 * threshold for q in probs.tolist()))
    keep = kept(min_p_filter(torch.tensor([row]), min_p)[0])
    assert keep == {i for i, q in enumerate(probs.tolist()) if q >= threshold}
    assert int(probs.argmax()) in keep


# ------------------------------------------------------------------------------------------ others


def test_repetition_penalty_is_ctrls_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_processors_match_transformers_warpers():
    """Same order and definitions as transformers: repetition penalty, temperature, top-k, top-p, min-p."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(3, 50, generator=g) * 3
        history = torch.randint(0, 50, (3, 12), generator=g)
        seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, history, True)
        params = SamplingParams(strategy="sample", temperature=0.7, top_k=20, top_p=0.8, min_p=0.05,
                                repetition_penalty=1.3)
        ref = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                                   TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)])
        ours, theirs = process(logits, params, seen), ref(history, logits.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
        torch.testing.assert_close(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_greedy_and_beam_ignore_the_sampling_filters():
    x = torch.randn(2, 30)
    for strategy in ("greedy", "beam"):
        p = SamplingParams(strategy=strategy, temperature=0.5, top_k=3, top_p=0.5, min_p=0.2)
        assert torch.equal(process(x, p), x)


def test_seeded_sampling_repeats_and_rows_are_independent():
    probs = torch.randn(4, 100)
    a = [sample(probs, make_generators(7, 4, torch.device("cpu"))) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    # row i uses seed + i whatever the batch: row 2 of a batch == row 0 alone with seed 9
    alone = sample(probs[2:3], make_generators(9, 1, torch.device("cpu")))
    assert alone.item() == a[0][2].item()
    # sampling follows the distribution: a token with probability ~1 is always drawn
    certain = torch.full((1, 10), -1e4)
    certain[0, 6] = 0
    gens = make_generators(0, 1, torch.device("cpu"))
    assert all(sample(certain, gens).item() == 6 for _ in range(20))


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(strategy="sample", top_p=0.8)   # keeps {0, 1} renormalised: 0.625 / 0.375
    gens = make_generators(1, 1, torch.device("cpu"))
    draws = np.array([sample(process(logits, params), gens).item() for _ in range(4000)])
    assert set(draws) <= {0, 1}
    assert abs((draws == 0).mean() - 0.625) < 0.03


def test_stop_length():
    eos = frozenset({9})
    assert stop_length([1, 2, 9], eos, ()) == 1
    assert stop_length([1, 2, 3], eos, ((2, 3),)) == 2
    assert stop_length([1, 2, 3], eos, ((1, 3),)) == 0
    assert stop_length([3], eos, ((2, 3),)) == 0


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("kw", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5),
    dict(min_p=-0.1), dict(min_p=1.1), dict(num_beams=0), dict(strategy="nucleus"), dict(max_new_tokens=0),
    dict(repetition_penalty=0.0), dict(num_return_sequences=2), dict(top_logprobs=-1), dict(seed="x"),
    dict(strategy="beam", num_beams=2, num_return_sequences=3), dict(stop_sequences=((),)),
])
def test_bad_settings_are_clear_errors(kw):
    with pytest.raises(GlassmindError):
        SamplingParams(**kw).validate()


def test_settings_against_the_vocabulary():
    SamplingParams(eos_token_ids=(5,)).validate(10)
    with pytest.raises(GlassmindError, match="outside the vocabulary"):
        SamplingParams(eos_token_ids=(10,)).validate(10)
    with pytest.raises(GlassmindError, match="outside the vocabulary"):
        SamplingParams(stop_sequences=((1, -1),)).validate(10)
    with pytest.raises(GlassmindError, match="top_logprobs"):
        SamplingParams(top_logprobs=11).validate(10)
