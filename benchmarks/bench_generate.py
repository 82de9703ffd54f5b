"""Generation speed: glassmind's Engine against transformers' `generate()` (with its KV cache) on the same
weights, alternately in one process.

The model is the issue's configuration as a GPT-2: 4 layers, d_model 256, 4 heads, vocabulary 8192,
context 256; random weights (speed does not depend on them), built in transformers and copied into ours with
glassmind.model.interop.from_hf, so both run identical weights. Work: prompts of 32 tokens, 224 new tokens,
greedy, no EOS (every sequence runs to the end), batch 1 and 8, fp32 and bf16.

Sides: ours eager (the default Engine: decode steps multiply by weights packed once per generate call,
glassmind/infer/fast_linear.py), ours compiled (`Engine(model, compile=True)`: the decode step compiled
once per batch size with torch.compile/inductor, fixed shapes, weights frozen and packed by inductor;
`--no-compile` skips it), with `--unpacked` also ours eager with the model's own F.linear
(`Engine(model, packed=False)`), transformers eager with its default dynamic cache, and transformers' best CPU
configuration: a static KV cache with the forward compiled by torch.compile (`generate(...,
cache_implementation="static", compile_config=CompileConfig(fullgraph=True, dynamic=False, mode="default"))`,
the path its docs give for static cache + torch.compile; on CPU transformers compiles only when the config's
`_compile_all_devices` flag is set, and "reduce-overhead" means CUDA graphs, so mode "default").
`--no-hf-compile` skips that side. Each round runs every side in a rotating order. Ratios are against the
faster transformers side of each row (its best), and also against eager transformers.

Metrics (medians over --reps alternating rounds; each round times, for each side, a generation of 1 token
and a full one):
  TTFT            wall time of the 1-token generation (prefill + first token + per-call setup).
  decode tok/s    batch x (new - 1) / (full generation - 1-token generation), wall clock.
  ratio (wall)    ours' decode tok/s over transformers', both by wall clock.
  ratio per CPU second  the same ratio from the process's CPU time: on a shared machine, wall time includes
                  waiting for a core; CPU time is the work done. The two are different numbers: quote each
                  under its own name.
  compile s       ours compiled: wall time of its first generation at that batch size (compilation; the
                  inductor cache starts empty unless TORCHINDUCTOR_CACHE_DIR is set, and fp32 and bf16
                  share generated C++ where they can).
Ours runs with its defaults, so it also computes each token's log-probability (transformers does not).

    python benchmarks/bench_generate.py                 # full table (several minutes on 2 cores)
    python benchmarks/bench_generate.py --quick         # 1 round, 64 new tokens: a smoke run
    python benchmarks/bench_generate.py --profile       # where our per-token time goes (--profile-batch 8)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold compile cache: "compile s" is a first compile's
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="glassmind-bench-inductor-")

import torch  # noqa: E402

from glassmind.infer import Engine, SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402


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


def hf_compile_config():
    from transformers import CompileConfig

    cfg = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    cfg._compile_all_devices = True  # transformers compiles on accelerators only unless this is set
    return cfg


def run_hf(hf, prompts: list[list[int]], new: int, compiled: bool = False) -> list[list[int]]:
    ids = torch.tensor(prompts)
    extra = dict(cache_implementation="static", compile_config=hf_compile_config()) if compiled else {}
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                          eos_token_id=None, pad_token_id=0, **extra)
    return out[:, ids.shape[1]:].tolist()


def measure(run, prompts: list[list[int]], new: int) -> tuple[dict, list[list[int]]]:
    """TTFT = a generation of 1 token; decode rate = the other new - 1 tokens of a full generation."""
    w1, c1 = timed(lambda: run(prompts, 1))
    out: list = []
    wn, cn = timed(lambda: out.append(run(prompts, new)))
    n = len(prompts) * (new - 1)
    return dict(ttft=w1, tps=n / (wn - w1), cpu_tps=n / (cn - c1)), out[0]


def bench(reps: int, new: int, prompt_len: int, compiled: bool, unpacked: bool = False,
          hf_compiled: bool = True) -> list[dict]:
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf, ours = build(dtype)
        engines = {"ours": Engine(ours)}
        if compiled:
            engines["compiled"] = Engine(ours, compile=True)
        if unpacked:
            engines["unpacked"] = Engine(ours, packed=False)
        sides = {name: (lambda p, n, e=e: run_ours(e, p, n)) for name, e in engines.items()}
        sides["hf"] = lambda p, n: run_hf(hf, p, n)
        if hf_compiled:
            sides["hfc"] = lambda p, n: run_hf(hf, p, n, compiled=True)
        names = list(sides)
        for batch in (1, 8):
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(1, 8192, (batch, prompt_len), generator=g).tolist()
            warm = {}
            for name, run in sides.items():
                # first-call allocations; compilation (transformers' static cache has one shape per length)
                warm[name], _ = timed(lambda: run(prompts, 8))
                if name == "hfc":
                    warm[name] += timed(lambda: run(prompts, new))[0]
            got: dict[str, list[dict]] = {name: [] for name in names}
            outs: dict[str, list] = {}
            for r in range(reps):
                for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                    m, outs[name] = measure(sides[name], prompts, new)
                    got[name].append(m)
            row = dict(dtype=dtype_name, batch=batch, same=outs["ours"] == outs["hf"],
                       same_compiled=outs.get("compiled", outs["ours"]) == outs["ours"],
                       same_hfc=outs.get("hfc", outs["hf"]) == outs["hf"],
                       compile_s=warm.get("compiled"), hf_compile_s=warm.get("hfc"))
            for name in got:
                for key in ("ttft", "tps", "cpu_tps"):
                    row[f"{name}_{key}"] = statistics.median(m[key] for m in got[name])
            # transformers' best side of this row, by wall clock and by CPU time separately
            hf_sides = [n for n in ("hf", "hfc") if n in got]
            row["best_hf"] = max(hf_sides, key=lambda n: row[f"{n}_tps"])
            row["best_hf_cpu"] = max(hf_sides, key=lambda n: row[f"{n}_cpu_tps"])
            for name in engines:
                row[f"{name}_ratio"] = row[f"{name}_tps"] / row[f"{row['best_hf']}_tps"]
                row[f"{name}_cpu_ratio"] = row[f"{name}_cpu_tps"] / row[f"{row['best_hf_cpu']}_cpu_tps"]
                row[f"{name}_ratio_eager_hf"] = row[f"{name}_tps"] / row["hf_tps"]
                row[f"{name}_cpu_ratio_eager_hf"] = row[f"{name}_cpu_tps"] / row["hf_cpu_tps"]
            rows.append(row)
            print(f"{dtype_name} batch {batch}: decode tok/s transformers eager {row['hf_tps']:.0f} (TTFT "
                  f"{1000 * row['hf_ttft']:.1f} ms)" + (
                      f", static cache + compiled {row['hfc_tps']:.0f} (TTFT {1000 * row['hfc_ttft']:.1f} ms, first "
                      f"calls {row['hf_compile_s']:.0f} s, same tokens as eager: {row['same_hfc']})"
                      if "hfc" in got else "") + f"; ours = transformers' tokens: {row['same']}", flush=True)
            for name in engines:
                print(f"  {name:<8} decode tok/s {row[f'{name}_tps']:.0f}: vs transformers' best "
                      f"{row[f'{name}_ratio']:.2f}x wall clock, {row[f'{name}_cpu_ratio']:.2f}x per CPU second; vs "
                      f"eager transformers {row[f'{name}_ratio_eager_hf']:.2f}x wall, "
                      f"{row[f'{name}_cpu_ratio_eager_hf']:.2f}x per CPU s; TTFT {1000 * row[f'{name}_ttft']:.1f} ms",
                      flush=True)
            if compiled:
                print(f"  compiled: first call {row['compile_s']:.1f} s, same tokens as eager: "
                      f"{row['same_compiled']}", flush=True)
    return rows


def table(rows: list[dict], reps: int, new: int, prompt_len: int) -> str:
    compiled = "compiled_tps" in rows[0]
    lines = [describe(),
             f"prompt {prompt_len} tokens, {new} new tokens, greedy, medians of {reps} alternating rounds, "
             f"torch threads {torch.get_num_threads()}. Ratios: ours' decode tok/s over the faster transformers "
             "side of the row (wall clock and per CPU second each pick their own faster side); in brackets, over "
             "eager transformers.",
             "",
             "| dtype | batch | side | decode tok/s | ratio (wall clock) | ratio per CPU second | TTFT ms | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['batch']} | transformers, dynamic cache (eager) | {r['hf_tps']:.0f} | | | "
                     f"{1000 * r['hf_ttft']:.1f} | |")
        if "hfc_tps" in r:
            lines.append(f"| | | transformers, static cache + compiled forward (first calls {r['hf_compile_s']:.0f} s) | "
                         f"{r['hfc_tps']:.0f} | | | {1000 * r['hfc_ttft']:.1f} | "
                         f"{'= eager' if r['same_hfc'] else 'no'} |")

        def cell(name):
            return (f"{r[f'{name}_ratio']:.2f}x ({r[f'{name}_ratio_eager_hf']:.2f}x) | "
                    f"{r[f'{name}_cpu_ratio']:.2f}x ({r[f'{name}_cpu_ratio_eager_hf']:.2f}x)")
        lines.append(f"| | | ours eager | {r['ours_tps']:.0f} | {cell('ours')} | {1000 * r['ours_ttft']:.1f} | "
                     f"{'yes' if r['same'] else 'no'} |")
        if compiled:
            lines.append(f"| | | ours compiled (first call {r['compile_s']:.0f} s) | {r['compiled_tps']:.0f} | "
                         f"{cell('compiled')} | {1000 * r['compiled_ttft']:.1f} | "
                         f"{'= eager' if r['same_compiled'] else 'no'} |")
        if "unpacked_tps" in r:
            lines.append(f"| | | ours eager, F.linear (packed=False) | {r['unpacked_tps']:.0f} | {cell('unpacked')} | "
                         f"{1000 * r['unpacked_ttft']:.1f} | |")
    lines.append(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return "\n".join(lines)


def profile(batch: int = 1, steps: int = 64, rounds: int = 5, compiled: bool = True,
            dtype: torch.dtype = torch.float32) -> None:
    """Where our per-token decode time goes, in CPU time per decode step (medians of alternating rounds):
    the engine's whole step, the model's decode step alone, the same matmuls called directly (with the
    packed kernels the engine uses, fast_linear.py, and with plain F.linear), the attention kernel alone,
    for the eager and the compiled step; the cost of packing the weights (once per generate call); then the
    floor the matmuls cannot beat (weights read once per step at the measured memory bandwidth), then
    torch.profiler's top operators."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from glassmind.infer.batch import DecoderBatch
    from glassmind.infer.compiled import CompiledDecoderBatch
    from glassmind.infer.fast_linear import DecodeView, PackedLinear, packed_decode

    _, ours = build(dtype)
    engines = {"eager": Engine(ours)}
    if compiled:
        engines["compiled"] = Engine(ours, compile=True)
    prompts = [list(range(1 + b, 33 + b)) for b in range(batch)]
    cfg = ours.config
    linears = [(m.weight, m.bias) for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    linears.append((ours.token_embedding.weight, None))  # the tied LM head
    packed = [PackedLinear(w, b, batch) for w, b in linears]
    xs = {w.shape[1]: torch.randn(batch, 1, w.shape[1], dtype=dtype) for w, _ in linears}
    H, D = cfg.n_heads, cfg.head_dim
    q = torch.randn(batch, H, 1, D, dtype=dtype)
    kv = torch.randn(batch, H, 32 + steps // 2, D, dtype=dtype)  # the average cache length over the run
    mask = torch.ones(batch, 1, 1, kv.shape[2], dtype=torch.bool)  # the compiled step always passes one

    def cpu(fn) -> float:
        c = time.process_time()
        fn()
        return time.process_time() - c

    def engine_step(engine):
        one = cpu(lambda: engine.generate(prompts, SamplingParams(max_new_tokens=1)))
        return (cpu(lambda: engine.generate(prompts, SamplingParams(max_new_tokens=steps))) - one) / (steps - 1)

    @torch.inference_mode()
    def model_step(make):
        batch_ = make()
        tok = batch_.prefill().argmax(-1)

        def loop():
            nonlocal tok
            for _ in range(steps):
                tok = batch_.step(tok).argmax(-1)
        return cpu(loop) / steps

    @torch.inference_mode()
    def matmuls():
        return cpu(lambda: [F.linear(xs[w.shape[1]], w, b) for _ in range(steps) for w, b in linears]) / steps

    @torch.inference_mode()
    def packed_matmuls():
        return cpu(lambda: [lin(xs[lin.weight.shape[1]]) for _ in range(steps) for lin in packed]) / steps

    @torch.inference_mode()
    def packing():  # what a generate call pays once, at its first decode step
        return cpu(lambda: [DecodeView(ours, batch) for _ in range(3)]) / 3

    @torch.inference_mode()
    def attention(k, mask):
        return cpu(lambda: [F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
                            for _ in range(steps * cfg.n_layers)]) / steps

    @torch.inference_mode()
    def read_weights():  # one pass over every weight matrix: the bytes a decode step must stream
        return cpu(lambda: [w.sum() for _ in range(steps) for w, _ in linears]) / steps

    parts = {"eager engine step": lambda: engine_step(engines["eager"]),
             "eager model step": lambda: model_step(lambda: DecoderBatch(ours, prompts, steps, decode_model=packed_decode(ours, steps))),
             "matmuls": packed_matmuls, "matmuls (F.linear)": matmuls, "packing": packing,
             "attention (eager)": lambda: attention(kv, None),
             "attention (compiled)": lambda: attention(kv, mask), "read weights": read_weights}
    if compiled:
        step_fn = engines["compiled"]._step
        parts["compiled engine step"] = lambda: engine_step(engines["compiled"])
        parts["compiled model step"] = lambda: model_step(lambda: CompiledDecoderBatch(ours, prompts, step_fn))
    t = time.perf_counter()
    for fn in parts.values():
        fn()  # warm-up, and compilation
    print(f"warm-up (compiling the step: {compiled}) {time.perf_counter() - t:.1f} s")
    got: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(rounds):
        for k, fn in parts.items():
            got[k].append(fn())
    med = {k: statistics.median(v) for k, v in got.items()}
    for side in engines:
        total = med[f"{side} engine step"]
        attn = med[f"attention ({side})"]
        if side == "eager":
            rows = [("matmuls (24 projections + the LM head, called alone, packed)", med["matmuls"]),
                    (f"attention kernel ({cfg.n_layers} sdpa)", attn),
                    ("rest of the step: layer norms, GELU, adds, views, cache writes, module calls, Python",
                     med["eager model step"] - med["matmuls"] - attn)]
        else:  # inductor picks its own GEMM kernels (in bf16 faster than the packed ones alone): not split
            rows = [(f"attention kernel ({cfg.n_layers} sdpa, masked)", attn),
                    ("rest of the step: inductor's GEMMs, fused elementwise kernels, cache writes, wrapper, guards",
                     med["compiled model step"] - attn)]
        rows += [
            (f"engine: logprob, choice, stop checks; {'packing' if side == 'eager' else 'the weight check'} "
             f"(once per call) / {steps - 1}", total - med[f"{side} model step"])]
        print(f"{side}: decode at batch {batch}, {str(dtype)[6:]}, CPU time per step (medians of {rounds}): "
              f"{1000 * total:.3f} ms ({1000 * total / batch:.3f} ms per token)")
        for name, v in rows:
            print(f"  {name:<94} {1000 * v:6.3f} ms  {100 * v / total:5.1f}%")
    print(f"the same matmuls with F.linear: {1000 * med['matmuls (F.linear)']:.3f} ms; packing every weight "
          f"(once per generate call, {DecodeView(ours, batch).kernels()}): {1000 * med['packing']:.2f} ms")
    n_bytes = sum(w.numel() * w.element_size() for w, _ in linears)
    print(f"floor: a step reads {n_bytes / 1e6:.1f} MB of weights; summing them alone takes "
          f"{1000 * med['read weights']:.3f} ms ({n_bytes / med['read weights'] / 1e9:.1f} GB/s on this core), the "
          f"matmuls {1000 * med['matmuls']:.3f} ms")

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        engines["eager"].generate(prompts, SamplingParams(max_new_tokens=steps))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=224)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="1 round of 64 new tokens")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine (saves ~2 min)")
    ap.add_argument("--unpacked", action="store_true", help="also time Engine(model, packed=False)")
    ap.add_argument("--no-hf-compile", action="store_true",
                    help="skip transformers' static cache + compiled forward (saves minutes of compilation)")
    ap.add_argument("--profile-batch", type=int, default=1, help="batch size of --profile")
    ap.add_argument("--profile-dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of --profile")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile(args.profile_batch, compiled=not args.no_compile,
                dtype=torch.bfloat16 if args.profile_dtype == "bf16" else torch.float32)
        return
    if args.quick:
        args.reps, args.new = 1, 64
    print(describe(), flush=True)
    rows = bench(args.reps, args.new, args.prompt, not args.no_compile, args.unpacked, not args.no_hf_compile)
    print()
    print(table(rows, args.reps, args.new, args.prompt))


if __name__ == "__main__":
    main()
