"""What machine a benchmark ran on, printed at its top: the CPU model, torch's CPU capability (the kernel
family torch dispatches to: DEFAULT, AVX2, AVX512, ...) and whether bf16 arithmetic is native (AVX512-BF16 or
AMX-BF16 in the CPU flags) or emulated, which decides how bf16 numbers compare across machines.

    from machine import describe; print(describe())     # benchmarks/ is on sys.path when a script runs
"""

from __future__ import annotations

import os
import platform

import torch


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("unknown CPU", platform.processor()):
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the name from platform, no flags
        pass
    return name, flags


def describe() -> str:
    name, flags = _cpuinfo()
    native = sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags)
    bf16 = f"native ({', '.join(native)})" if native else "not native (emulated or converted to fp32)"
    return (f"CPU: {name}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
            f"torch.backends.cpu.get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}; "
            f"bf16: {bf16}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    print(describe())
