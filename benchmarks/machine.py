"""What machine a benchmark ran on, printed at its top: the CPU model, torch's CPU capability (the kernel
family torch dispatches to: DEFAULT, AVX2, AVX512, ...), whether bf16 arithmetic is native there, the dtype
`--dtype auto` picks on it (glassmind.common: the same check the verbs make), and the load, which decides how
far wall-clock numbers can be trusted.

    from machine import describe; print(describe())     # benchmarks/ is on sys.path when a script runs
"""

from __future__ import annotations

import os

import torch

from glassmind.common import cpu_facts, cpu_summary, dtype_name, resolve_dtype


def describe() -> str:
    auto, _ = resolve_dtype("auto", "cpu", announce=False)
    return (f"CPU: {cpu_summary()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
            f"torch.backends.cpu.get_cpu_capability() = {cpu_facts().capability}; --dtype auto picks "
            f"{dtype_name(auto)}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    print(describe())
