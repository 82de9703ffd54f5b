"""Generation speed: glassmind's Engine against transformers' `generate()` (with its KV cache) on the same
weights, alternately in one process.

The model is the issue's configuration as a GPT-2: 4 layers, d_model 256, 4 heads, vocabulary 8192,
context 256; random weights (speed does not depend on them), built in transformers and copied into ours with
glassmind.model.interop.from_hf, so both run identical weights. Work: prompts of 32 tokens, 224 new tokens,
greedy, no EOS (every sequence runs to the end), batch 1 and 8, fp32 and bf16.

Metrics (medians over --reps alternating rounds; each round times, for each side, a generation of 1 token
and a full one):
  TTFT            wall time of the 1-token generation (prefill + first token + per-call setup).
  decode tok/s    batch x 223 / (full generation - 1-token generation), wall clock.
  per CPU second  the same ratio from the process's CPU time: on a shared machine, wall time includes
                  waiting for a core; CPU time is the work done.
Ours runs with its defaults, so it also computes each token's log-probability (transformers does not).

    python benchmarks/bench_generate.py                 # full table (several minutes on 2 cores)
    python benchmarks/bench_generate.py --quick         # 1 round, 64 new tokens: a smoke run
    python benchmarks/bench_generate.py --profile       # where our per-token time goes
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from glassmind.infer import Engine, SamplingParams  # noqa: E402


def build(dtype: torch.dtype, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from glassmind.model.interop import from_hf

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=8192, n_positions=256, n_embd=256, n_layer=4, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    ours = from_hf(hf).eval()
    return hf.to(dtype), ours.to(dtype)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(). CPU time counts the work done, not the time
    spent waiting for a core: on a shared machine it is the steadier of the two."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def run_ours(engine: Engine, prompts: list[list[int]], new: int) -> list[list[int]]:
    return [r.ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=new))]


def run_hf(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                          eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def measure(run, prompts: list[list[int]], new: int) -> tuple[dict, list[list[int]]]:
    """TTFT = a generation of 1 token; decode rate = the other new - 1 tokens of a full generation."""
    w1, c1 = timed(lambda: run(prompts, 1))
    out: list = []
    wn, cn = timed(lambda: out.append(run(prompts, new)))
    n = len(prompts) * (new - 1)
    return dict(ttft=w1, tps=n / (wn - w1), cpu_tps=n / (cn - c1)), out[0]


def bench(reps: int, new: int, prompt_len: int) -> list[dict]:
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf, ours = build(dtype)
        engine = Engine(ours)
        sides = {"ours": lambda p, n: run_ours(engine, p, n), "hf": lambda p, n: run_hf(hf, p, n)}
        for batch in (1, 8):
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(1, 8192, (batch, prompt_len), generator=g).tolist()
            for run in sides.values():
                run(prompts, 8)  # warm-up: first-call allocations
            got: dict[str, list[dict]] = {"ours": [], "hf": []}
            outs: dict[str, list] = {}
            for r in range(reps):
                for name in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):  # alternate who goes first
                    m, outs[name] = measure(sides[name], prompts, new)
                    got[name].append(m)
            row = dict(dtype=dtype_name, batch=batch, same=outs["ours"] == outs["hf"])
            for name in got:
                for key in ("ttft", "tps", "cpu_tps"):
                    row[f"{name}_{key}"] = statistics.median(m[key] for m in got[name])
            row["ratio"] = row["ours_tps"] / row["hf_tps"]
            row["cpu_ratio"] = row["ours_cpu_tps"] / row["hf_cpu_tps"]
            rows.append(row)
            print(f"{dtype_name} batch {batch}: decode tok/s ours {row['ours_tps']:.0f} vs transformers "
                  f"{row['hf_tps']:.0f} ({row['ratio']:.2f}x; per CPU second {row['cpu_ratio']:.2f}x); "
                  f"TTFT ours {1000 * row['ours_ttft']:.1f} ms vs {1000 * row['hf_ttft']:.1f} ms; "
                  f"same tokens: {row['same']}", flush=True)
    return rows


def table(rows: list[dict], reps: int, new: int, prompt_len: int) -> str:
    lines = [f"prompt {prompt_len} tokens, {new} new tokens, greedy, medians of {reps} alternating rounds, "
             f"torch threads {torch.get_num_threads()}",
             "",
             "| dtype | batch | ours decode tok/s | transformers decode tok/s | ratio | ratio per CPU second | "
             "ours TTFT ms | transformers TTFT ms | same tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['ours_tps']:.0f} | {r['hf_tps']:.0f} | "
                     f"{r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {1000 * r['ours_ttft']:.1f} | "
                     f"{1000 * r['hf_ttft']:.1f} | {'yes' if r['same'] else 'no'} |")
    return "\n".join(lines)


def profile(steps: int = 64, rounds: int = 5) -> None:
    """Where our per-token decode time goes at batch 1 (fp32), in CPU time per token (medians of alternating
    rounds): the engine's whole step, the model's decode forward alone, the same matmuls called directly,
    and the attention kernel alone; then torch.profiler's top operators."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from glassmind.infer.engine import DecoderBatch

    _, ours = build(torch.float32)
    engine = Engine(ours)
    prompts = [list(range(1, 33))]
    cfg = ours.config
    linears = [(m.weight, m.bias) for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    linears.append((ours.token_embedding.weight, None))  # the tied LM head
    xs = {w.shape[1]: torch.randn(1, 1, w.shape[1]) for w, _ in linears}
    H, D = cfg.n_heads, cfg.head_dim
    q = torch.randn(1, H, 1, D)
    kv = torch.randn(1, H, 32 + steps // 2, D)  # the average cache length over the run

    def cpu(fn) -> float:
        c = time.process_time()
        fn()
        return time.process_time() - c

    def engine_step():
        one = cpu(lambda: engine.generate(prompts, SamplingParams(max_new_tokens=1)))
        return (cpu(lambda: engine.generate(prompts, SamplingParams(max_new_tokens=steps))) - one) / (steps - 1)

    @torch.inference_mode()
    def model_step():
        batch = DecoderBatch(ours, prompts, steps)
        tok = batch.prefill().argmax(-1)

        def loop():
            nonlocal tok
            for _ in range(steps):
                tok = batch.step(tok).argmax(-1)
        return cpu(loop) / steps

    @torch.inference_mode()
    def matmuls():
        return cpu(lambda: [F.linear(xs[w.shape[1]], w, b) for _ in range(steps) for w, b in linears]) / steps

    @torch.inference_mode()
    def attention():
        return cpu(lambda: [F.scaled_dot_product_attention(q, kv, kv) for _ in range(steps * cfg.n_layers)]) / steps

    parts = {"engine step (all)": engine_step, "model decode forward": model_step,
             "matmuls alone": matmuls, "attention kernel alone": attention}
    for fn in parts.values():
        fn()
    got: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(rounds):
        for k, fn in parts.items():
            got[k].append(fn())
    med = {k: statistics.median(v) for k, v in got.items()}
    total = med["engine step (all)"]
    rows = [("matmuls (25 linears incl. the LM head)", med["matmuls alone"]),
            ("attention kernel (4 sdpa)", med["attention kernel alone"]),
            ("rest of the model forward: other ops, module calls, Python",
             med["model decode forward"] - med["matmuls alone"] - med["attention kernel alone"]),
            ("engine: logprob, choice, stop checks, bookkeeping", total - med["model decode forward"])]
    print(f"decode at batch 1, fp32, CPU time per token (medians of {rounds}): {1000 * total:.3f} ms")
    for name, v in rows:
        print(f"  {name:<60} {1000 * v:6.3f} ms  {100 * v / total:5.1f}%")

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(prompts, SamplingParams(max_new_tokens=steps))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=224)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="1 round of 64 new tokens")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile()
        return
    if args.quick:
        args.reps, args.new = 1, 64
    rows = bench(args.reps, args.new, args.prompt)
    print()
    print(table(rows, args.reps, args.new, args.prompt))


if __name__ == "__main__":
    main()
