"""The sentence each from-scratch suite writes about its own numbers (glassmind.evals.verdict): it says an
effect showed only when the intervals are apart, and says 'not learned' when the model is at chance."""

from __future__ import annotations

from glassmind.evals import verdict
from glassmind.evals.stats import wilson


def _row(k, n=40, **cond):
    lo, hi = wilson(k, n)
    return {**cond, "n": n, "correct": k, "accuracy": k / n, "ci_lo": lo, "ci_hi": hi}


def _pos(pe, s, m, e):
    return [_row(k, positional=pe, n_pairs=16, position=w) for w, k in (("start", s), ("middle", m), ("end", e))]


def test_position_verdict_tells_chance_from_a_u_shape_from_no_effect():
    rows = _pos("rope", 5, 4, 6) + _pos("learned", 36, 8, 35) + _pos("sinusoidal", 30, 26, 31)
    got = verdict.position(rows, 1 / 8, 16)
    assert "not learned" in got[0]        # 5/40 = chance: every interval reaches 1/8
    assert "lost in the middle" in got[1]  # 0.20 in the middle against 0.90 and 0.88
    assert "no position effect" in got[2]  # 0.65 against 0.75 and 0.78: intervals overlap


def test_position_verdict_names_a_place_below_the_best_when_it_is_not_the_u_shape():
    # the quick suite's learned-positions model at 16 records: start 40/40, middle 40/40, end 21/40
    got = verdict.position(_pos("learned", 40, 40, 21) + _pos("rope", 40, 21, 21), 1 / 8, 16)
    assert "not the U-shape: end below start" in got[0] and "middle" not in got[0].split(":")[1].split("(")[0]
    assert "not the U-shape: middle and end below start" in got[1]


def test_arithmetic_verdict_refuses_to_judge_generalisation_of_an_unlearned_task():
    plain = [_row(0, digits_format="plain", operand_digits=d) for d in (1, 2, 3, 4)]
    rev = [_row(k, digits_format="reversed", operand_digits=d) for d, k in ((1, 40), (2, 38), (3, 30), (4, 12))]
    got = verdict.arithmetic(plain + rev, 3)
    assert "plain digits: addition not learned" in got[0]
    assert got[1].startswith("reversed digits: learned at trained lengths (1 digits 1.00") and "above zero at 4" in got[1]
    assert "3 digits (trained): reversed is better" in got[2]  # 30/40 against 0/40
    assert "4 digits (beyond training): reversed is better" in got[3]  # 12/40 against 0/40
    rev_close = [_row(k, digits_format="reversed", operand_digits=d) for d, k in ((1, 40), (2, 38), (3, 30), (4, 2))]
    got = verdict.arithmetic(plain + rev_close, 3)
    assert "no difference shown" in got[-1]  # 2/40 against 0/40: intervals overlap
    assert "above zero at 4 digits (0.05" in got[1]  # above zero, yet not shown better than plain
    assert verdict.arithmetic([_row(0, digits_format=f, operand_digits=d) for f in ("plain", "reversed")
                               for d in (1, 4)], 3)[-1].startswith("reversed digits: addition not learned")


def test_arithmetic_verdict_compares_every_trick_with_the_plain_baseline():
    rows = [_row(k, digits_format=f, operand_digits=d) for f, ks in
            (("plain", (30, 20, 5, 0, 0)), ("reversed", (40, 40, 37, 0, 0)), ("hints", (40, 40, 40, 25, 0)))
            for d, k in zip((1, 2, 3, 4, 5), ks)]
    got = verdict.arithmetic(rows, 3)
    assert [g.split(" digits")[0] for g in got[:3]] == ["plain", "reversed", "hints"]
    assert "no length generalisation" in got[0] and "no length generalisation" in got[1]
    assert "above zero at 4 digits" in got[2] and "5 digits" not in got[2]  # 0/40 at 5 is not above zero
    tail = got[3:]
    assert [t.split(":")[0] for t in tail] == ["3 digits (trained)", "4 digits (beyond training)",
                                               "5 digits (beyond training)"] * 2
    assert "3 digits (trained): reversed is better (plain 0.12" in tail[0]  # 37/40 against 5/40
    assert "4 digits (beyond training): no difference shown (plain" in tail[1]  # reversed vs plain: 0 and 0
    assert "4 digits (beyond training): hints is better (plain" in tail[4]


def test_dose_verdict_needs_the_gap_intervals_apart():
    shows = [{"planted_rate": 0.0, "template_gap": 0.01, "gap_lo": -0.01, "gap_hi": 0.03},
             {"planted_rate": 0.5, "template_gap": 0.48, "gap_lo": 0.45, "gap_hi": 0.51}]
    got = verdict.dose(shows)[0]
    assert got.startswith("The planted bias shows") and "slope 0.94" in got
    flat = [dict(shows[0]), {"planted_rate": 0.5, "template_gap": 0.02, "gap_lo": 0.0, "gap_hi": 0.04}]
    assert verdict.dose(flat)[0].startswith("No dose-response shown")
