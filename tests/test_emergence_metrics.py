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
