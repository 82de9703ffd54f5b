"""Time glassmind.evals.cli.quick_suite on one run: every applicable eval suite at the quick budget.

    python benchmarks/bench_eval_quick.py RUN [OUT] [--threads N]   (N: CPU threads in all; default every core)

Prints the seconds of each suite, the total wall time, the CPU seconds of this process and of its children
(the from-scratch models train in `glassmind pretrain` subprocesses), and the CPU it ran on. Start from an empty
OUT: models already trained there are reused and would make the timing meaningless.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from glassmind.evals.cli import quick_suite


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("out", nargs="?")
    p.add_argument("--threads", type=int, default=None, help="CPU threads the evals may use in all (default: every core)")
    a = p.parse_args()
    out = Path(a.out) if a.out else Path(a.run) / "evals"
    if out.exists() and any(out.glob("*/models/*/model.safetensors")):
        print(f"warning: {out} already holds trained eval models; they are reused and the time is not a cold run")
    t = time.time()
    res = quick_suite(a.run, out, threads=a.threads)
    wall = time.time() - t
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({k: round(v["seconds"], 1) if isinstance(v, dict) else round(v, 1) for k, v in res.items()},
                     indent=1))
    for k, v in res.items():
        if isinstance(v, dict) and "error" in v:
            print(f"{k}: {v['error']}")
    print(f"total wall {wall:.0f} s; CPU {me.ru_utime + me.ru_stime:.0f} s here + "
          f"{kids.ru_utime + kids.ru_stime:.0f} s in training subprocesses; "
          f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), os.cpu_count()={__import__('os').cpu_count()}, "
          f"--threads {a.threads}")


if __name__ == "__main__":
    main()
