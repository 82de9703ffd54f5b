"""`glassmind eval [RUN ...] --suite NAME [--budget quick|full|smoke] [--out DIR]`: one suite of the limits evals.

    glassmind eval runs/demo/align/sft runs/demo/align/dpo --suite calibration   # one panel per stage
    glassmind eval runs/minilm --suite bias         # WEAT on the converted all-MiniLM-L6-v2 + planted dose
    glassmind eval runs/demo/pretrain --suite position --budget full

Results go to OUT (default RUN/evals/<suite>/, or runs/evals/<suite>/ without a run): points.csv, PNGs,
result.json, card.md (see glassmind/evals/output.py). From-scratch suites train their small models under
OUT/models/ and reuse them when run again with the same data and budget.

quick_suite(run_dir, out_dir) runs every applicable suite at the quick budget (what the demo calls).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from glassmind.common import GlassmindError, add_config_args, config_field, config_from_args, run_main
from glassmind.evals.context import BUDGETS, EvalContext

# suite -> (module, function, needs a run, one line)
SUITES: dict[str, tuple[str, str, str]] = {
    "calibration": ("glassmind.evals.calibration", "run", "ECE and reliability diagrams of decoder runs (chat, or pre-trained 3-shot) on the verifiable tasks"),
    "hallucination": ("glassmind.evals.hallucination", "run", "accuracy, confident errors and abstention vs a fact's exposure"),
    "bias": ("glassmind.evals.bias", "run", "WEAT on the run's embeddings; templates, CrowS pairs, WEAT vs a planted rate"),
    "position": ("glassmind.evals.position", "run", "key-value lookup at start/middle/end per positional encoding"),
    "reversal": ("glassmind.evals.scratch", "reversal", "the reversal curse with and without reverse-augmented data"),
    "arithmetic": ("glassmind.evals.scratch", "arithmetic", "addition length generalisation, plain vs reversed digits"),
}


@dataclass
class EvalConfig:
    suite: str = config_field("calibration", "which eval: " + "; ".join(f"{k}: {v[2]}" for k, v in SUITES.items()),
                              choices=tuple(SUITES))
    budget: str = config_field("quick", "quick (minutes, small probes), full, or smoke (seconds: checks the pipeline; its models learn nothing)", choices=tuple(BUDGETS))
    out: str | None = config_field(None, "output directory (default RUN/evals/SUITE, or runs/evals/SUITE)")
    threads: int | None = config_field(None, "CPU threads the eval may use in all (default: every core): the models a "
                                                   "suite trains run side by side, one per core")
    dose: bool = config_field(True, "bias: also train the planted-bias dose-response models (--no-dose: WEAT on the runs only)")


def check_runs(runs: list[str]) -> list[Path]:
    out = []
    for r in runs:
        p = Path(r)
        if not (p / "config.json").exists():
            raise GlassmindError(f"{r}: no config.json there; give a run directory written by glassmind "
                                 "(or `glassmind convert --from-hf DIR --out RUN` for a Hugging Face model)")
        out.append(p)
    return out


def run_suite(suite: str, runs: list[Path], out: Path, budget: str = "quick", threads: int | None = None,
              command: str | None = None, dose: bool = True) -> dict:
    import importlib

    if suite not in SUITES:
        raise GlassmindError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
    mod, fn, _ = SUITES[suite]
    if suite == "calibration":
        from glassmind.evals.calibration import check

        check(runs)  # before any output: a refused eval leaves nothing behind
    if threads:
        import torch

        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    ctx = EvalContext(runs=runs, out=out, budget=budget, threads=threads, command=command, dose=dose,
                      log=lambda *a: print(*a, flush=True))
    print(f"eval {suite} ({budget}) -> {out}", flush=True)
    return getattr(importlib.import_module(mod), fn)(ctx)


def applicable(run_dir: Path) -> list[str]:
    """The suites that apply to a run: calibration to decoders (chat runs, and pre-trained ones 3-shot); the
    rest always (they train their own small models, or read embeddings any decoder or encoder has)."""
    from glassmind.evals.calibration import applies

    return [s for s in SUITES if s != "calibration" or applies(run_dir)]


def quick_suite(run_dir, out_dir, *, threads: int | None = None) -> dict:
    """Every applicable suite at the quick budget on one run, results under out_dir/<suite>/. Returns
    {suite: result dict (or {"error": message})} and "seconds" per suite and in total."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    t0 = time.time()
    results: dict = {}
    for suite in applicable(run_dir):
        t = time.time()
        try:
            results[suite] = run_suite(suite, [run_dir], out_dir / suite, "quick", threads,
                                       command=f"glassmind eval {run_dir} --suite {suite} --budget quick --out {out_dir / suite}")
        except GlassmindError as e:
            results[suite] = {"error": str(e)}
        results[suite]["seconds"] = time.time() - t
    results["seconds"] = time.time() - t0
    return results


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="glassmind eval", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", metavar="RUN", help="run directories (calibration: several = lifecycle stages)")
    add_config_args(p, EvalConfig)
    ns = p.parse_args(argv)
    cfg = config_from_args(EvalConfig, ns)
    runs = check_runs(ns.runs)
    if cfg.suite == "calibration" and not runs:
        raise GlassmindError("--suite calibration needs RUN (one or more decoder runs: pre-trained, sft, dpo, ...)")
    out = Path(cfg.out) if cfg.out else (runs[0] / "evals" / cfg.suite if runs else Path("runs/evals") / cfg.suite)
    if cfg.suite == "bias" and not cfg.dose and not runs:
        raise GlassmindError("--suite bias --no-dose measures WEAT on RUN: give a run, or drop --no-dose")
    result = run_suite(cfg.suite, runs, out, cfg.budget, cfg.threads, dose=cfg.dose)
    for k, v in result["numbers"].items():
        print(f"  {k}: {v}")
    print(f"wrote {out}/card.md ({result['seconds']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)
