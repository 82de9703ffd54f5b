"""What every suite receives: the runs it reads, where it writes, the budget, a logger."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# per budget: training steps of the from-scratch models and how many probes per condition
BUDGETS = {
    "quick": {"steps": 500, "batch_tokens": 1024, "probes": 40, "rtuning_steps": 300,
              # the pronoun association forms near 1000 steps in some trainings and not in others (README)
              "bias_steps": 2000,
              # addition is learned near step 4000 at d_model 64 (README); 1000 steps learned nothing
              "arith_steps": 4000,
              # lookup forms near step 1000 with RoPE and learned positions (glassmind/evals/position.py)
              "position_steps": 1500},
    "full": {"steps": 2000, "batch_tokens": 2048, "probes": 120, "rtuning_steps": 600, "bias_steps": 4000,
             "arith_steps": 8000, "position_steps": 4000},
    # a smoke test of a suite's whole pipeline (tests): models that learn nothing, every stage still runs
    "smoke": {"steps": 8, "batch_tokens": 256, "probes": 40, "rtuning_steps": 4, "bias_steps": 8,
              "arith_steps": 8, "position_steps": 8},
}


@dataclass
class EvalContext:
    runs: list[Path]
    out: Path
    budget: str = "quick"
    threads: int | None = None
    command: str | None = None
    dose: bool = True  # bias: train the planted-bias dose-response models
    log: object = field(default=print)

    @property
    def b(self) -> dict:
        return BUDGETS[self.budget]

    @property
    def work(self) -> Path:
        """where from-scratch models are trained (reused by a repeated eval with the same data)"""
        return self.out / "models"
