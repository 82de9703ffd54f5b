"""Why the position suite trains with its own loss (glassmind/evals/position.py): the same decoder, data and
steps, with the loss on the looked-up values and copy rows only (the suite) and with the causal-LM loss on
every next token (what the pretrain recipe computes). Prints the held-out lookup accuracy (16 records) as it
trains; the two run side by side, one core each.

    python benchmarks/explore_position_loss.py OUT [STEPS] [rope|learned|sinusoidal] [constant|cosine]
"""

from __future__ import annotations

import sys
from pathlib import Path

from glassmind.common import cpu_summary
from glassmind.evals import position as pos
from glassmind.train import pool


def main() -> None:
    out = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
    pe = sys.argv[3] if len(sys.argv) > 3 else "rope"
    decay = sys.argv[4] if len(sys.argv) > 4 else pos.DECAY
    points = [{"name": f"{pe}-{loss}-{steps}-{decay}", "positional": pe, "steps": steps, "seed": 0, "loss": loss,
               "decay": decay, "out": str(out / f"{pe}-{loss}-{decay}")} for loss in ("lookups", "all")]
    results = pool.run_points(out, points, pos.train_point, workers=2, label="loss variants")
    print(f"{pe} positions, {steps} steps, {decay} lr, fp32; {cpu_summary()}")
    for p, r in zip(points, results):
        curve = " ".join(f"{c['step']}:{c['lookup_accuracy']:.2f}" for c in r["curve"][1::2])
        print(f"loss on {p['loss']:>7}: {curve}  ({r['train_seconds']} s)")


if __name__ == "__main__":
    main()
