"""Training-step throughput: the glassmind decoder against transformers' GPT2LMHeadModel, same configuration.

One step = forward, cross-entropy, backward, AdamW update (fused, for both), zero_grad, on (batch 8, context 256) token ids,
vocab 8192, 4 layers, 4 heads, d_model 256 (GPT-2's architecture: learned positions, pre-LayerNorm,
tanh-GELU, tied embeddings, biases, no dropout). HF gets its best CPU setting of the same function:
`activation_function="gelu_pytorch_tanh"` (one fused op; `gelu_new`, the hand-written tanh GELU of GPT-2's
config, computes the same values to 6e-8 in about four times the time and would handicap HF). Both run in fp32 and under bf16 autocast, alternating
step by step in one process so that load on the machine hits both alike. Prints medians, the ratio
(HF time / ours: > 1 means ours is faster), and MFU against this machine's measured matmul rate of the same
dtype (`glassmind.train.metrics.measure_matmul_flops`), and the same ratios of process CPU time (all threads),
which load from other jobs disturbs less than wall time.

Each side computes its loss the way its users do: HF through `model(ids, labels=ids)` (it shifts the labels
itself), ours as `glassmind pretrain --fused-loss auto` does: under bf16 the fused output projection and
cross-entropy (`objectives.linear_cross_entropy` on the final hidden states, no full fp32 logits), in fp32
F.cross_entropy on materialised logits (the path the golden losses pin). `--ours-loss fused|logits` forces
one of the two in both dtypes. Wherever ours uses the fused loss, a third side runs ours with HF's loss path
(logits, then cross-entropy) and its ratio is printed beside the headline: that is the like-for-like
comparison of the two models; the headline includes the fused loss, a lever HF does not have.

    python benchmarks/bench_train_step.py [--steps 12] [--threads N] [--ours-loss auto|fused|logits] [--profile]

`--profile` adds a torch.profiler table of the top ops for each model (bf16), to see what dominates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from glassmind.data.objectives import linear_cross_entropy
from glassmind.model import ModelConfig, Transformer
from glassmind.train.metrics import measure_matmul_flops

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

VOCAB, LAYERS, HEADS, D_MODEL, CONTEXT, BATCH = 8192, 4, 4, 256, 256, 8


def ours() -> torch.nn.Module:
    cfg = ModelConfig(arch="decoder", vocab_size=VOCAB, context_length=CONTEXT, d_model=D_MODEL, n_heads=HEADS,
                      n_layers=LAYERS, activation="gelu_tanh", norm="layernorm", norm_position="pre",
                      positional="learned", tie_embeddings=True, bias=True, dropout=0.0)
    return Transformer(cfg)


def hf() -> torch.nn.Module:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=D_MODEL, n_layer=LAYERS, n_head=HEADS,
                     activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def loss_of(model, x, y, ours_loss, dtype):
    """x (B, T) inputs, y (B, T) next tokens -> mean loss, under the caller's autocast."""
    if isinstance(model, Transformer):
        if ours_loss == "fused" or (ours_loss == "auto" and dtype == torch.bfloat16):  # the head is tied
            return linear_cross_entropy(model.features(x), model.token_embedding.weight, y, model.lm_bias)
        return F.cross_entropy(model(x).float().view(-1, VOCAB), y.view(-1))  # (B*T, V) fp32 logits
    return model(x, labels=x).loss  # HF shifts the labels itself: T - 1 targets per row, the last ignored


def make_step(model, dtype, ours_loss="auto"):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)  # same for both

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_of(model, x, y, ours_loss, dtype)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model and dtype")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ours-loss", choices=("auto", "fused", "logits"), default="auto",
                    help="ours: as pretrain's --fused-loss auto (fused under bf16), the fused output projection "
                         "+ cross-entropy in both dtypes, or fp32 logits then F.cross_entropy in both")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=g)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    tokens = BATCH * CONTEXT

    cfg = ours().config
    flops_per_token = cfg.flops_per_token(CONTEXT, training=True)
    print(describe())
    print(f"{torch.get_num_threads()} threads; {cfg.num_params():,} parameters; "
          f"{flops_per_token / 1e6:.1f} MFLOP per token (train); HF activation gelu_pytorch_tanh")

    rows, ratios = [], []
    for dtype in (torch.float32, torch.bfloat16):
        name_dt = str(dtype).replace("torch.", "")
        fused = args.ours_loss == "fused" or (args.ours_loss == "auto" and dtype == torch.bfloat16)
        peak = measure_matmul_flops(dtype, "cpu", n=1024, seconds=1.0)
        models = {"glassmind": ours(), "hf_gpt2": hf()}
        steps = {name: make_step(m, dtype, args.ours_loss) for name, m in models.items()}
        if fused:  # ours on HF's loss path too: the like-for-like ratio
            models["glassmind_logits"] = ours()
            steps["glassmind_logits"] = make_step(models["glassmind_logits"], dtype, "logits")
        names = list(models)
        times = {name: [] for name in names}
        cpu = {name: [] for name in names}  # process CPU time, all threads
        for i in range(args.warmup + args.steps):
            order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
            for name in order:
                t0, c0 = time.perf_counter(), time.process_time()
                steps[name](inputs, targets)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if i >= args.warmup:
                    times[name].append(dt)
                    cpu[name].append(dc)
        med = {name: statistics.median(t) for name, t in times.items()}
        med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
        for name in names:
            tps = tokens / med[name]
            rows.append((name_dt, name, med[name] * 1e3, tps, tps * flops_per_token / peak, peak))
        for ours_name in [n for n in names if n.startswith("glassmind")]:
            path = ("fused loss" if fused and ours_name == "glassmind" else "logits + cross-entropy (HF's path)")
            ratio = med["hf_gpt2"] / med[ours_name]
            # each HF step over the ours step timed in the same round: robust to load that drifts
            paired = statistics.median(h / o for h, o in zip(times["hf_gpt2"], times[ours_name]))
            cpu_ratio = med_cpu["hf_gpt2"] / med_cpu[ours_name]
            cpu_paired = statistics.median(h / o for h, o in zip(cpu["hf_gpt2"], cpu[ours_name]))
            ratios.append((name_dt, path, ratio, paired, cpu_ratio, cpu_paired))
            print(f"{name_dt} ({path}): ours {med[ours_name] * 1e3:.1f} ms, hf {med['hf_gpt2'] * 1e3:.1f} ms, "
                  f"ratio of medians (hf/ours) {ratio:.3f}x, median paired ratio {paired:.3f}x; CPU time "
                  f"{med_cpu[ours_name] * 1e3:.1f} vs {med_cpu['hf_gpt2'] * 1e3:.1f} ms, ratio {cpu_ratio:.3f}x, "
                  f"paired {cpu_paired:.3f}x; matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
        if args.profile and dtype == torch.bfloat16:
            from torch.profiler import ProfilerActivity, profile

            for name in names:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        steps[name](inputs, targets)
                print(f"\n--- {name} ({dtype}), 3 steps ---")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))

    print("\n| dtype | model | median step (ms) | tokens/s | MFU | matmul peak (GFLOP/s) |")
    print("|---|---|---|---|---|---|")
    for dtype, name, ms, tps, mfu, peak in rows:
        print(f"| {dtype} | {name} | {ms:.1f} | {tps:,.0f} | {mfu:.1%} | {peak / 1e9:.1f} |")
    print(f"\nours: {args.ours_loss} loss; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| dtype | ours' loss path | HF time / ours (ratio of medians) | median paired ratio | "
          "CPU time: ratio of medians | CPU time: median paired ratio |")
    print("|---|---|---|---|---|---|")
    for dtype, path, ratio, paired, cpu_ratio, cpu_paired in ratios:
        print(f"| {dtype} | {path} | {ratio:.3f}x | {paired:.3f}x | {cpu_ratio:.3f}x | {cpu_paired:.3f}x |")


if __name__ == "__main__":
    main()
