"""What a suite's numbers say, in one sentence computed from them: whether the effect the suite looks for
showed, and when it did not, why the numbers cannot show it (e.g. a model that never learned the task).

A difference counts only when the two 95% intervals are apart (a conservative test: intervals that
overlap slightly can still differ at 5%, so 'no difference' here means 'not shown at this size'); 'learned'
means the interval's lower end is above chance.
"""

from __future__ import annotations

from typing import Sequence


def apart(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two intervals (lo, hi) that do not overlap."""
    return a[0] > b[1] or b[0] > a[1]


def _fmt(row: dict) -> str:
    return f"{row['accuracy']:.2f} [{row['ci_lo']:.2f}, {row['ci_hi']:.2f}]"


def position(rows: Sequence[dict], chance: float, n_pairs: int) -> list[str]:
    """Per positional encoding at the longest context: 'retrieval not learned' (every position's interval
    reaches chance), 'lost in the middle' (middle below both ends, intervals apart), another position effect
    (a place below the best place, intervals apart: named, with the U-shape said to be absent), or 'no
    position effect'."""
    out = []
    for pe in dict.fromkeys(r["positional"] for r in rows):
        r = {x["position"]: x for x in rows if x["positional"] == pe and x["n_pairs"] == n_pairs}
        s, m, e = r["start"], r["middle"], r["end"]
        cells = f"start {_fmt(s)}, middle {_fmt(m)}, end {_fmt(e)}"
        ci = {k: (x["ci_lo"], x["ci_hi"]) for k, x in r.items()}
        best = max(r, key=lambda k: r[k]["accuracy"])
        below = [k for k in ("start", "middle", "end") if k != best and apart(ci[k], ci[best])]
        if all(x["ci_lo"] <= chance for x in (s, m, e)):
            out.append(f"{pe}, {n_pairs} records: retrieval not learned (every interval reaches chance "
                       f"{chance:.3f}: {cells}); the U-shape cannot be judged from this model.")
        elif apart(ci["middle"], ci["start"]) and apart(ci["middle"], ci["end"]) and \
                m["accuracy"] < min(s["accuracy"], e["accuracy"]):
            out.append(f"{pe}, {n_pairs} records: lost in the middle ({cells}; middle below both ends, intervals apart).")
        elif below:
            out.append(f"{pe}, {n_pairs} records: a position effect, but not the U-shape: {' and '.join(below)} "
                       f"below {best} ({cells}; intervals apart).")
        else:
            out.append(f"{pe}, {n_pairs} records: no position effect shown ({cells}; intervals overlap).")
    return out


def arithmetic(rows: Sequence[dict], trained_max: int) -> list[str]:
    """Per digits format: whether addition was learned at the trained lengths and whether any accuracy
    beyond them is above zero; then each other format against the first (the plain baseline) at the longest
    trained length and at every length beyond training."""
    out = []
    fmts = list(dict.fromkeys(r["digits_format"] for r in rows))
    learned = {}
    beyond = sorted({r["operand_digits"] for r in rows if r["operand_digits"] > trained_max})
    for f in fmts:
        inside = [r for r in rows if r["digits_format"] == f and r["operand_digits"] <= trained_max]
        best = max(inside, key=lambda r: r["ci_lo"])
        learned[f] = best["ci_lo"] > 0
        if not learned[f]:
            out.append(f"{f} digits: addition not learned even at trained lengths (best {best['operand_digits']}-digit "
                       f"accuracy {_fmt(best)}, interval reaches 0): length generalisation cannot be judged.")
            continue
        past = [r for r in rows if r["digits_format"] == f and r["operand_digits"] > trained_max]
        above = [r for r in past if r["ci_lo"] > 0]
        out.append(f"{f} digits: learned at trained lengths (" + ", ".join(
                       f"{r['operand_digits']} digits {_fmt(r)}" for r in inside) + "); beyond them " + (
                       "above zero at " + ", ".join(f"{r['operand_digits']} digits ({_fmt(r)})" for r in above)
                       if above else "no accuracy above zero (" + ", ".join(
                           f"{r['operand_digits']} digits {_fmt(r)}" for r in past) + "): no length generalisation")
                   + ".")
    base = fmts[0]
    for f in fmts[1:]:
        if not (learned[f] or learned[base]):
            continue
        for d in [trained_max, *beyond]:
            a, b = (next(r for r in rows if r["digits_format"] == g and r["operand_digits"] == d) for g in (base, f))
            where = "trained" if d <= trained_max else "beyond training"
            if apart((a["ci_lo"], a["ci_hi"]), (b["ci_lo"], b["ci_hi"])):
                hi = a if a["accuracy"] > b["accuracy"] else b
                out.append(f"{d} digits ({where}): {hi['digits_format']} is better "
                           f"({base} {_fmt(a)}, {f} {_fmt(b)}; intervals apart).")
            else:
                out.append(f"{d} digits ({where}): no difference shown ({base} {_fmt(a)}, "
                           f"{f} {_fmt(b)}; intervals overlap).")
    return out


def dose(rows: Sequence[dict]) -> list[str]:
    """The template gap at the highest planted rate against the unbiased (0%) model, and its slope on the rate."""
    if len(rows) < 2:
        return []
    rows = sorted(rows, key=lambda r: r["planted_rate"])
    lo, hi = rows[0], rows[-1]
    rates = [r["planted_rate"] for r in rows]
    gaps = [r["template_gap"] for r in rows]
    mr, mg = sum(rates) / len(rates), sum(gaps) / len(gaps)
    slope = sum((x - mr) * (y - mg) for x, y in zip(rates, gaps)) / sum((x - mr) ** 2 for x in rates)
    a, b = (lo["gap_lo"], lo["gap_hi"]), (hi["gap_lo"], hi["gap_hi"])
    cells = (f"template gap {lo['template_gap']:.3f} [{a[0]:.3f}, {a[1]:.3f}] at {lo['planted_rate']:.0%} vs "
             f"{hi['template_gap']:.3f} [{b[0]:.3f}, {b[1]:.3f}] at {hi['planted_rate']:.0%}; least-squares slope "
             f"{slope:.2f} per unit rate (1.00 = the gap equals the planted rate)")
    if apart(a, b) and hi["template_gap"] > lo["template_gap"]:
        return [f"The planted bias shows: {cells}."]
    return [f"No dose-response shown: {cells}; intervals overlap."]
