"""The emergence metrics against hand-worked values."""

import math

import numpy as np
import pytest

from glassmind.studies.emergence import (brier, edit_distance, exact_match, per_token_accuracy, predicted_exact_match,
                                         target_log_likelihood, zero_resolution)


def test_exact_match_and_per_token_accuracy_on_a_near_miss():
    # 123 + 456 = 579 predicted as 578: all-or-nothing says 0, per-digit says 2/3
    assert exact_match([5, 7, 8], [5, 7, 9]) == 0.0 and exact_match([5, 7, 9], [5, 7, 9]) == 1.0
    assert per_token_accuracy([5, 7, 8], [5, 7, 9]) == pytest.approx(2 / 3)
    assert per_token_accuracy([5], [5, 7, 9]) == pytest.approx(1 / 3)  # missing positions are wrong


def test_edit_distance_hand_worked():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1          # one deletion
    assert edit_distance([3, 2, 1], [1, 2, 3]) == 2       # two substitutions
    assert edit_distance("kitten", "sitting") == 3        # the textbook example (k->s, e->i, +g)
    assert edit_distance([], [4, 5]) == 2


def test_log_likelihood_and_brier_hand_worked():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    target = [0, 1]
    assert target_log_likelihood(probs, target) == pytest.approx(math.log(0.5) + math.log(0.8))
    # (0.5-1)^2 + 0.25^2 + 0.25^2 = 0.375 ; 0.1^2 + (0.8-1)^2 + 0.1^2 = 0.06 ; mean 0.2175
    assert brier(probs, target) == pytest.approx(0.2175)


def test_p_to_the_l_and_zero_resolution():
    assert predicted_exact_match(0.9, 5) == pytest.approx(0.59049)
    # 0 correct of 100: true accuracy up to ~3% is still consistent at 95% (rule of three: 3/n)
    assert zero_resolution(100) == pytest.approx(1 - 0.05 ** 0.01)
    assert zero_resolution(100) == pytest.approx(0.03, abs=0.001)
    assert zero_resolution(10_000) < zero_resolution(100) / 50


def test_wilson_interval_hand_worked():
    from glassmind.studies.emergence import wilson_interval

    # 0 of 10: [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415]; the normal interval would say [0, 0]
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.959964 ** 2 / (10 + 1.959964 ** 2))
    assert hi == pytest.approx(0.2775, abs=1e-4)
    # 5 of 10: the textbook [0.2366, 0.7634]
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 1 of 100: [0.0018, 0.0545]
    assert wilson_interval(1, 100) == pytest.approx((0.00177, 0.05446), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_n_to_resolve_is_the_rule_of_three():
    from glassmind.studies.emergence import n_to_resolve

    # accuracy 1%: P(0 right of n) = 0.99^n <= 0.05 first at n = 299 (ln 0.05 / ln 0.99 = 298.07)
    assert n_to_resolve(0.01) == 299
    assert 0.99 ** 299 <= 0.05 < 0.99 ** 298
    assert math.isinf(n_to_resolve(0.0))


def _rung(em, digit, edit, ll, br):
    return {"exact_match": em, "per_digit": digit, "edit_distance": edit, "log_likelihood": ll, "brier": br}


def test_verdict_says_not_visible_when_exact_match_jumps_and_the_others_rise_smoothly():
    from glassmind.studies.emergence import jump_verdict

    # per-digit accuracy climbs evenly 0.2 -> 0.9 (p^4 of those is the hockey stick 0.002 -> 0.66), edit
    # distance and Brier fall evenly, log-likelihood rises evenly
    ladder = [_rung(0.00, 0.2, 3.2, -9.0, 0.90), _rung(0.01, 0.4, 2.4, -7.0, 0.70),
              _rung(0.05, 0.6, 1.6, -5.0, 0.50), _rung(0.60, 0.8, 0.8, -3.0, 0.30), _rung(0.66, 0.9, 0.4, -2.0, 0.2)]
    v = jump_verdict(ladder)
    assert v["jump"] and v["step"] == 2  # between rungs 3 and 4: 0.55 of the 0.66 rise
    assert v["em_share"] == pytest.approx(0.55 / 0.66)
    assert v["metrics"]["per_digit"] == pytest.approx(0.2 / 0.7)
    assert v["visible"] == []
    assert "NOT visible" in v["text"]


def test_verdict_says_visible_when_the_continuous_metrics_jump_at_the_same_step():
    from glassmind.studies.emergence import jump_verdict

    ladder = [_rung(0.0, 0.10, 3.6, -12.0, 0.95), _rung(0.0, 0.12, 3.5, -11.8, 0.94),
              _rung(0.7, 0.90, 0.4, -1.5, 0.15), _rung(0.75, 0.92, 0.3, -1.2, 0.12)]
    v = jump_verdict(ladder)
    assert v["jump"] and v["step"] == 1
    assert sorted(v["visible"]) == sorted(["per_digit", "edit_distance", "log_likelihood", "brier"])
    assert "IS visible in every continuous metric" in v["text"]
    # and no jump at all: exact match flat at zero
    flat = [_rung(0.0, 0.1 * i, 3 - 0.3 * i, -9 + i, 0.9 - 0.1 * i) for i in range(4)]
    assert not jump_verdict(flat)["jump"] and "does not jump" in jump_verdict(flat)["text"]
