"""Do the limits evals' unlearned effects show at a larger budget? One model per call, trained through the same
path as the suites (glassmind.evals.toy.train, the pretrain recipe in a subprocess) and scored by the suite's own
scorer; prints what it measured. Exploration, not a suite: the README's table of larger budgets comes from it.

    python benchmarks/explore_eval_budgets.py bias STEPS RATE        # planted-bias model: dose measures
    python benchmarks/explore_eval_budgets.py arith STEPS plain|reversed|hints  # the arithmetic suite's model
    python benchmarks/explore_eval_budgets.py pad STEPS   # the earlier spaced format, reversed, zero-padded
    python benchmarks/explore_eval_budgets.py offsets 0 RUN  # a trained hints model on sums hinted from 'a' vs 'd'
    [--work DIR] (default /tmp/glassmind-explore)

Models are reused when data and flags are unchanged (toy.train's stamp).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from glassmind.evals import gen, toy
from glassmind.evals.bias import dose_measures


def bias(work: Path, steps: int, rate: float) -> None:
    docs = gen.planted_bias_corpus(rate, n_sentences=12000)  # what the bias suite trains on
    run = toy.train(work / f"bias-{rate}-{steps}", docs, steps=steps, context=64, batch_tokens=1024, threads=1)
    model, tok = toy.load(run)
    print(dose_measures(model, tok))


def arith(work: Path, steps: int, fmt: str) -> None:
    docs, probes = gen.arithmetic_data(train_digits=3, test_digits=(1, 2, 3, 4, 5), fmt=fmt,
                                       n_train=20000, n_test=40)  # what the arithmetic suite trains on
    t = time.time()
    run = toy.train(work / f"add-{fmt}-{steps}", docs, steps=steps, context=64, vocab_size=257, batch_tokens=1024,
                    threads=1)
    print("train s", round(time.time() - t))
    model, tok = toy.load(run)
    ans = toy.greedy(model, tok, [p.prompt for p in probes], max_new_tokens=13, stop=";")
    for d in (1, 2, 3, 4, 5):
        sel = [(a, p) for a, p in zip(ans, probes) if p.condition["digits"] == d]
        ok = sum(a == p.answer for a, p in sel)
        print(f"{d} digits: {ok}/{len(sel)} exact; e.g. {sel[0][1].prompt} | {sel[0][0]} | want {sel[0][1].answer}")


def pad(work: Path, steps: int) -> None:
    """Reversed digits, operands zero-padded to 3 and sums to 4: digit i of every number sits at one offset
    from its number's start (the alignment position coupling / abacus embeddings give by construction). In the
    suite's earlier format (digits separated by spaces, BPE tokenizer), kept so the README's row reproduces."""
    def num(n: int, w: int) -> str:
        return " ".join(str(n).zfill(w)[::-1])

    rng = random.Random("pad")
    tests = {d: [(rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1),
                  rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)) for _ in range(40)] for d in (1, 2, 3)}
    seen = {p for v in tests.values() for p in v}
    lines = []
    while len(lines) < 20000:
        a, b = rng.randint(0, 10 ** rng.randint(1, 3) - 1), rng.randint(0, 10 ** rng.randint(1, 3) - 1)
        if (a, b) not in seen:
            lines.append(f"{num(a, 3)} + {num(b, 3)} = {num(a + b, 4)}")
    docs = [" ; ".join(lines[i:i + 8]) + " ;" for i in range(0, len(lines), 8)]
    t = time.time()
    run = toy.train(work / f"add-pad-{steps}", docs, steps=steps, context=128, batch_tokens=1024, threads=1)
    print("train s", round(time.time() - t))
    model, tok = toy.load(run)
    for d, pairs in tests.items():
        prompts = [f"{num(a, 3)} + {num(b, 3)} =" for a, b in pairs]
        ans = toy.greedy(model, tok, prompts, max_new_tokens=10, stop=";")
        ok = sum(" ".join(x.split()) == num(a + b, 4) for x, (a, b) in zip(ans, pairs))
        print(f"{d} digits: {ok}/{len(pairs)} exact; e.g. {prompts[0]} | {ans[0]} | want {num(sum(pairs[0]), 4)}")


def offsets(run: Path) -> None:
    """The arithmetic suite's hints model (OUT/models/add-hints) on new sums of 3-5 digit operands with hints
    from 'a' (as the suite tests) and from 'd' (offset 3: at 4 digits every letter was seen in the same role in
    training): a model that finds digits by their letter does as well at both; one that counts does not."""
    model, tok = toy.load(run)
    rng = random.Random("offsets")
    for d in (3, 4, 5):
        pairs = [(rng.randint(10 ** (d - 1), 10 ** d - 1), rng.randint(10 ** (d - 1), 10 ** d - 1)) for _ in range(40)]
        for off in (0, 3):
            prompts = [f";{gen.number(a, 'hints', off)}+{gen.number(b, 'hints', off)}=" for a, b in pairs]
            want = [gen.number(a + b, "hints", off) for a, b in pairs]
            ans = toy.greedy(model, tok, prompts, max_new_tokens=13, stop=";")
            ok = sum(x == w for x, w in zip(ans, want))
            print(f"{d} digits, hints from {gen.HINTS[off]!r}: {ok}/40 exact; e.g. {prompts[0]} | {ans[0]} | want {want[0]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("bias", "arith", "pad", "offsets"))
    p.add_argument("steps", type=int)
    p.add_argument("arg", nargs="?", help="bias: the planted rate; arith: plain, reversed or hints; offsets: the run")
    p.add_argument("--work", default="/tmp/glassmind-explore")
    a = p.parse_args()
    work = Path(a.work)
    if a.what == "bias":
        bias(work, a.steps, float(a.arg or 0.5))
    elif a.what == "arith":
        arith(work, a.steps, a.arg or "reversed")
    elif a.what == "offsets":
        offsets(Path(a.arg))
    else:
        pad(work, a.steps)


if __name__ == "__main__":
    main()
