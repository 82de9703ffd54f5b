"""What observation costs: a forward pass capturing every autopsy name against a plain forward pass.

The model is the demo decoder's shape (`glassmind demo`'s pretrain-decoder: depth 2 -> d_model 128, 2 heads,
2 layers, the demo tokenizer's vocabulary 4096) with the context raised from 128 to 256 so that a 256-token
prompt fits; random weights (the cost does not depend on them). Work: one prompt of 256 random tokens, batch
1, fp32, under torch.no_grad(). Sides, alternately in one process, each round in a rotating order:

  plain      model(ids): the fused attention kernel, no hooks (the reference at its best: no autopsy code
             exists on this path).
  capture    glassmind.autopsy.run_with_cache(model, ids): every name of the hooks table (attention scores
             and patterns recomputed, each head's result, q/k/v, residuals, FFN activations).
  pattern    run_with_cache with only the attention patterns (names=...hook_pattern): the opt-in cost of the
             heatmaps alone.

Prints medians (ms), the ratios to plain, the bytes held, the CPU and torch's CPU capability.

Then (unless --no-tuned-lens) the wall time of training the tuned lens for this shape with the defaults
`glassmind autopsy --tuned-lens` uses (16384 tokens of the built-in corpus' size, at most 300 Adam steps of
512 tokens, stopped early when the held-out KL flattens; context 128 as the demo decoder's), on random token
ids and random weights: a shape-only figure (early stopping makes the step count depend on the weights).
The figure the README reports, on the real demo decoder, is benchmarks/bench_tuned_lens.py's.

    python benchmarks/bench_autopsy.py            # 50 rounds
    python benchmarks/bench_autopsy.py --quick    # 5 rounds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from glassmind.model import ModelConfig, Transformer
from glassmind.autopsy import run_with_cache
from glassmind.common import cpu_facts  # noqa: E402




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-tuned-lens", action="store_true", help="skip timing the tuned lens's training")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder", vocab_size=4096, context_length=max(256, a.tokens), d_model=128, n_heads=2,
                      n_layers=2, positional="learned")
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, a.tokens))
    patterns = [f"blocks.{i}.attn.hook_pattern" for i in range(cfg.n_layers)]
    sides = {
        "plain": lambda: model(ids),
        "capture": lambda: run_with_cache(model, ids),
        "pattern": lambda: run_with_cache(model, ids, names=patterns),
    }
    held = run_with_cache(model, ids)[1].nbytes()
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}  # process CPU time (all threads): on a shared
    # machine wall time includes waiting for a core, CPU time is the work done
    rounds = 5 if a.quick else a.rounds
    names = list(sides)
    with torch.no_grad():
        for _ in range(3):  # warm-up: allocator, first-call dispatch
            for f in sides.values():
                f()
        for r in range(rounds):
            for k in names[r % 3:] + names[: r % 3]:
                t0, c0 = time.perf_counter(), time.process_time()
                sides[k]()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    medc = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    print(f"CPU: {cpu_facts().model}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    print(f"demo-decoder shape (d_model 128, 2 layers, 2 heads, vocab 4096), {a.tokens}-token prompt, {rounds} rounds")
    for k in names:
        print(f"  {k:8s} wall median {med[k]:7.2f} ms  ratio {med[k] / med['plain']:.2f}x   "
              f"CPU median {medc[k]:7.2f} ms  ratio {medc[k] / medc['plain']:.2f}x")
    print(f"  capture everything holds {held / 1e6:.1f} MB")
    if not a.no_tuned_lens:
        from glassmind.autopsy.lens import train_tuned_lens

        demo = Transformer(ModelConfig(arch="decoder", vocab_size=4096, context_length=128, d_model=128, n_heads=2,
                                       n_layers=2, positional="learned")).eval()
        data = torch.randint(0, 4096, (128, 128), generator=torch.Generator().manual_seed(0))  # 16384 tokens
        t0, c0 = time.perf_counter(), time.process_time()
        _, stats = train_tuned_lens(demo, None, ids=data, progress=False)
        print(f"tuned lens for the demo-decoder shape (random weights): {time.perf_counter() - t0:.1f} s wall, "
              f"{time.process_time() - c0:.1f} s CPU over {torch.get_num_threads()} threads "
              f"({stats['steps']} of at most {stats['max_steps']} steps, {stats['tokens']} tokens)")


if __name__ == "__main__":
    main()
