"""Is bf16 autocast faster than fp32 for a glassmind training step on this CPU, at the demo's model shapes?

`--dtype auto` decides by capability (bf16 only where the CPU computes it natively: common.resolve_dtype). This
measures what that choice buys or costs on the machine at hand, for a training step shaped like the alignment
verbs' (a decoder of the demo's shape: 2 layers, 2 heads, context 128, vocabulary 4096; batch 32 x 128 tokens;
forward under autocast, the loss in fp32, backward, AdamW), at several widths (d_model; d_ff = 4 d_model).

Both dtypes run alternately in one process on the same model and batch (so a change in load hits both), after
a warmup step each; it prints the median step time per dtype and the ratio bf16 / fp32. Two clocks:

  - CPU time with one thread (time.process_time): what the kernels cost, the least disturbed by other work;
  - wall time with all threads: what a user waits for on an idle machine (on a loaded one it is noise).

    python benchmarks/bench_dtype.py [--widths 128 256 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from glassmind.model import ModelConfig, Transformer  # noqa: E402


def step_fn(model: Transformer, ids: torch.Tensor, opt: torch.optim.Optimizer):
    def step(dtype: str) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(width: int, repeats: int, clock, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, context_length=128, d_model=width, n_heads=2, n_layers=2, d_ff=4 * width)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (32, 128))
    step = step_fn(model, ids, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for d in times:
        step(d)  # warmup: oneDNN primitive creation, allocator
    for _ in range(repeats):
        for d in times:
            t0 = clock()
            step(d)
            times[d].append(clock() - t0)
    med = {d: statistics.median(v) for d, v in times.items()}
    return {"width": width, "params": model.num_params(), **{f"{d}_ms": 1000 * m for d, m in med.items()},
            "ratio": med["bf16"] / med["fp32"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    print(describe())
    all_threads = torch.get_num_threads()
    for name, clock, threads in (("CPU time, 1 thread", time.process_time, 1),
                                 (f"wall time, {all_threads} threads", time.perf_counter, all_threads)):
        print(f"\n{name}: median of {args.repeats} training steps (batch 32 x 128 tokens), alternating dtypes")
        print("| d_model | parameters | fp32 ms | bf16 ms | bf16 / fp32 |")
        print("|---|---|---|---|---|")
        for w in args.widths:
            r = measure(w, args.repeats, clock, threads)
            print(f"| {w} | {r['params']:,} | {r['fp32_ms']:.0f} | {r['bf16_ms']:.0f} | {r['ratio']:.2f} |",
                  flush=True)
    torch.set_num_threads(all_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
