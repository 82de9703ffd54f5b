"""Scale-out on this machine: training throughput of one process vs N ranks (DDP, FSDP, ...) on the same
global batch, MFU, and each layout's measured vs planned memory per rank.

    python benchmarks/bench_parallel.py                           # CPU, gloo, 2 ranks (the RESULTS.md table)
    python benchmarks/bench_parallel.py --device cuda --preset gpu --mp bf16 --nproc 8 \\
        --layouts "dp=8;fsdp=8;tp=8"                              # GPUs, NCCL (benchmarks/gpu_parallel.sh)

Launches alternate (one process, then each timed layout, round after round) for `--rounds` rounds; each
launch times `--steps` optimizer steps after 2 warm-up steps and reports its median step time; the table
shows the median over rounds and the speed ratio to one process (on CPU: the faster of one process on all
cores and one process on one core; on GPU: one GPU). The layouts after the first two are run once, for
memory. A layout that fails prints its error instead of a row.

Memory per rank (rank 0), measured after a step: weights, gradients and AdamW state are the bytes of the
local tensors the rank holds; activations are the bytes autograd saved for backward in one micro-batch's
forward (saved_tensors_hooks; weights and FSDP's gathered weights left out; not measured under pp, whose
schedule runs forward inside); on GPU also the peak allocated memory. Planned: glassmind.parallel.memory.

MFU (PaLM, appendix B): model FLOPs per token (ModelConfig.flops_per_token) x tokens/s over the devices'
peak: the datasheet dense bf16/fp16 peak for known GPUs, else the matmul rate measured on this machine.

Internal: torchrun runs this file with --worker OUT for each launch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: the CPU, capability, bf16)


PRESETS = {  # model, global batch (sequences), sequence length
    "cpu": (dict(vocab_size=4096, context_length=128, d_model=256, n_heads=8, n_layers=4), 16, 128),
    "gpu": (dict(vocab_size=32768, context_length=1024, d_model=1024, n_heads=16, n_layers=12), 64, 1024),
}
COMMON = dict(positional="rope", activation="swiglu", dropout=0.0, norm="rmsnorm", bias=False)
DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense bf16


def model_config(preset: str):
    from glassmind.model import ModelConfig

    cfg, batch, seq = PRESETS[preset]
    return ModelConfig(**cfg, **COMMON), batch, seq


# ----------------------------------------------------------------------------------------------------
# one launch (every rank)


def worker(out: Path, a) -> None:
    import torch.distributed as dist

    from glassmind.model import Transformer
    from glassmind.parallel import memory
    from glassmind.parallel.apply import apply_parallel
    from glassmind.parallel.mesh import close_distributed, init_distributed, parse_spec
    from glassmind.train.optim import adamw

    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    if a.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    spec = parse_spec(a.layout, world, mp=a.mp)
    mesh = init_distributed(spec, device.type)
    cfg, global_batch, seq = model_config(a.preset)
    torch.manual_seed(0)
    pm = apply_parallel(Transformer(cfg).to(device), spec, mesh)
    opt = pm.wrap_optimizer(adamw(pm.module, lr=1e-4))
    data = torch.randint(0, cfg.vocab_size, (global_batch, seq + 1), generator=torch.Generator().manual_seed(0))
    micro = data.chunk(pm.dp_size)[pm.dp_rank].split(a.micro_batch)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        if mesh is not None:
            dist.barrier()

    def step(measure: bool = False) -> dict:
        measured: dict = {}
        for i, m in enumerate(micro):
            with counting_saved(pm, measured, enabled=measure and i == 0 and pm.schedule is None):
                pm.forward_backward(m[:, :-1], m[:, 1:], loss_scale=1 / len(micro), sync=i == len(micro) - 1)
        if measure:
            measured["grads"] = sum(_local(p.grad).numel() * p.grad.element_size()
                                    for _, p in pm.named_parameters() if p.grad is not None)
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return measured

    for _ in range(2):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    measured = step(measure=True)
    measured["params"] = 4 * sum(_local(p).numel() for _, p in pm.named_parameters())
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps its shard's optimizer in .optim
    measured["optimizer"] = sum(_local(v).numel() * v.element_size() for s in inner.state.values()
                                for v in s.values() if isinstance(v, torch.Tensor))
    measured["peak_allocated"] = peak_alloc
    planned = memory.rank_memory(cfg, spec, memory.Workload(global_batch, a.micro_batch, seq))
    if (dist.get_rank() if mesh is not None else 0) == 0:
        dtype = torch.float32 if a.mp == "fp32" else torch.bfloat16
        (out / "result.json").write_text(json.dumps({
            "step_s": statistics.median(times), "tokens": global_batch * seq, "world": world,
            "flops_per_token": cfg.flops_per_token(seq), "peak_flops": peak_flops(device, dtype),
            "measured": measured,
            "planned": {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer,
                        "activations": planned.activations, "total": planned.total}}))
    close_distributed()


@contextlib.contextmanager
def counting_saved(pm, out: dict, *, enabled: bool):
    """Count the bytes autograd saves for backward inside the block into out["activations"]. Weights are
    left out: this rank's shards, and under FSDP the gathered parameters (and views of them such as the W^T
    a Linear saves), whose storage FSDP frees after forward; the plan counts those as "gathered"."""
    if not enabled:
        yield
        return
    weights = {_local(p).untyped_storage().data_ptr() for _, p in pm.named_parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = _local(t).untyped_storage()
        gathered = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
        if not gathered and storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out["activations"] = sum(seen.values())


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in DATASHEET_PEAK.items():
            if key in name and dtype != torch.float32:
                return flops
    from glassmind.train.metrics import measure_matmul_flops

    return measure_matmul_flops(dtype, device, seconds=0.3)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


# ----------------------------------------------------------------------------------------------------
# the driver


def label(layout: str, nproc: int, threads: int, device: str) -> str:
    if layout:
        return layout
    if device == "cuda":
        return "1 GPU"
    return f"1 process, {threads} thread{'s' if threads > 1 else ''}"


def launch(a, layout: str, nproc: int, threads: int) -> dict | str:
    from glassmind.parallel.launch import torchrun

    with tempfile.TemporaryDirectory() as tmp:
        args = [__file__, "--worker", tmp, "--layout", layout, "--steps", str(a.steps), "--micro-batch",
                str(a.micro_batch), "--threads", str(threads), "--device", a.device, "--mp", a.mp,
                "--preset", a.preset]
        res = torchrun(args, nproc=nproc, timeout=a.timeout, env={"OMP_NUM_THREADS": str(threads)})
        if not res.ok or not (Path(tmp) / "result.json").exists():
            lines = [x for x in res.output.splitlines() if re.search(r"\w+(Error|Exception): ", x)]
            why = "timed out" if res.timed_out else (lines[-1].split("]:")[-1].strip() if lines else
                                                      f"exit {res.returncode}")
            return why.replace("|", "/")[:160]
        return json.loads((Path(tmp) / "result.json").read_text())


def mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset", default=None, choices=tuple(PRESETS), help="model size (default: the device's)")
    ap.add_argument("--mp", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--nproc", type=int, default=2, help="ranks for the layouts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward per replica")
    ap.add_argument("--layouts", default="dp=2;fsdp=2;dp=2,zero=1;dp=2,zero=2;tp=2;pp=2,microbatches=4",
                    help="';'-separated layouts of --nproc ranks; the first two are timed against one process")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--layout", default="")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    print(describe(), flush=True)
    a.preset = a.preset or a.device
    if a.worker:
        worker(Path(a.worker), a)
        return
    cores = os.cpu_count() or 1
    layouts = [x for x in a.layouts.split(";") if x]
    per_rank = max(1, cores // a.nproc) if a.device == "cpu" else 1
    # (layout, processes, torch threads per process)
    baseline = [("", 1, cores), ("", 1, 1)] if a.device == "cpu" else [("", 1, 1)]
    timed = baseline + [(x, a.nproc, per_rank) for x in layouts[:2]]
    extra = [(x, a.nproc, per_rank) for x in layouts[2:]]
    times: dict[tuple, list[float]] = {k: [] for k in timed}
    results: dict[tuple, dict | str] = {}
    for r in range(a.rounds):
        for key in timed:  # alternate, round after round
            res = launch(a, *key)
            results[key] = res
            if isinstance(res, dict):
                times[key].append(res["step_s"])
            print(f"round {r + 1}: {label(key[0], key[1], key[2], a.device):<22} "
                  f"{res['step_s'] * 1e3 if isinstance(res, dict) else float('nan'):8.1f} ms/step", file=sys.stderr)
    for key in extra:
        results[key] = launch(a, *key)

    cfg, global_batch, seq = model_config(a.preset)
    n = cfg.num_params()
    print(f"\nModel: decoder d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab "
          f"{cfg.vocab_size}, {n / 1e6:.1f}M parameters; global batch {global_batch} x {seq} tokens, micro batch "
          f"{a.micro_batch} per replica, AdamW, {a.mp}; {a.device}"
          f"{' (' + torch.cuda.get_device_name(0) + ')' if a.device == 'cuda' else f', {cores} cores'}; torch "
          f"{torch.__version__}. Medians of {a.rounds} alternating launches x {a.steps} steps.\n")
    base_times = [statistics.median(times[k]) for k in baseline if times[k]]
    base = min(base_times) if base_times else float("nan")
    print("| layout | processes x threads | step time | tokens/s | MFU | speed vs one process |")
    print("|---|---|---|---|---|---|")
    for key in timed + extra:
        res = results[key]
        name = label(key[0], key[1], key[2], a.device)
        if not isinstance(res, dict):
            print(f"| {name} | {key[1]} x {key[2]} | failed: {res} | | | |")
            continue
        t = statistics.median(times[key]) if times.get(key) else res["step_s"]
        tok_s = res["tokens"] / t
        mfu = tok_s * res["flops_per_token"] / (res["peak_flops"] * res["world"])
        print(f"| {name} | {key[1]} x {key[2]} | {t * 1e3:,.0f} ms | {tok_s:,.0f} | {mfu:.1%} | {base / t:.2f}x |")
    print("\nMemory of rank 0, MiB, measured / planned (glassmind plan's accounting):\n")
    print("| layout | weights | grads | AdamW state | activations (one micro-batch) | peak allocated / planned total |")
    print("|---|---|---|---|---|---|")
    for key in [timed[0]] + timed[len(baseline):] + extra:
        res = results[key]
        if not isinstance(res, dict):
            continue
        m, p = res["measured"], res["planned"]
        print(f"| {label(key[0], key[1], key[2], a.device)} | {mib(m['params'])} / {mib(p['params'])} | "
              f"{mib(m['grads'])} / {mib(p['grads'])} | {mib(m['optimizer'])} / {mib(p['optimizer'])} | "
              f"{mib(m.get('activations'))} / {mib(p['activations'])} | {mib(m.get('peak_allocated'))} / "
              f"{mib(p['total'])} |")


if __name__ == "__main__":
    main()
