"""One decode step of a continuous batch (RunningBatch.step), eager against packed (fast_linear's DecodeView),
per batch size and dtype, on the demo decoder: the two sides alternate in one process, medians of --rounds.

    python benchmarks/bench_running_step.py --run runs/bench-serve/pretrain-decoder
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from glassmind.common import cpu_facts
    from glassmind.infer.continuous import RunningBatch
    from glassmind.model import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{cpu_facts().model}, capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"1 thread, load average {os.getloadavg()[0]:.1f} at the start")
    print("| dtype | rows | eager ms (CPU) | packed ms (CPU) | packed / eager |\n|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        model = load_model(args.run).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
        for rows in (int(r) for r in args.rows.split(",")):
            sides = {name: RunningBatch(model, packed=name == "packed") for name in ("eager", "packed")}
            g = torch.Generator().manual_seed(rows)
            prompts = [torch.randint(0, model.config.vocab_size, (12,), generator=g).tolist() for _ in range(rows)]
            for b in sides.values():
                b.admit(prompts)
            times: dict[str, list[float]] = {n: [] for n in sides}
            tok = torch.zeros(rows, dtype=torch.long)
            for i in range(args.rounds):
                for name in (("eager", "packed") if i % 2 == 0 else ("packed", "eager")):
                    b = sides[name]
                    if b.col >= b.capacity - 1:       # keep the cache from filling: start the rows again
                        b.remove(list(range(rows)))
                        b.admit(prompts)
                    t0 = time.process_time()
                    b.step(tok)
                    times[name].append(time.process_time() - t0)
            e, p = (statistics.median(times[n][5:]) * 1000 for n in ("eager", "packed"))
            print(f"| {dtype} | {rows} | {e:.3f} | {p:.3f} | {p / e:.2f}x |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
