"""`glassmind plan`: before renting the GPUs, see what each layout costs each device and which one fits.

    glassmind plan --d-model 2048 --n-layers 24 --n-heads 16 --vocab-size 50304 --context-length 2048 \\
        --devices 8 --memory-gb 80 --global-batch 512 --micro-batch 4 --seq-len 2048 --mp bf16
    glassmind plan --from runs/base --devices 2 --memory-gb 24 --layout fsdp=2 --layout tp=2

For every layout of the devices (dp x tp x pp, with ZeRO 0-3 on the data-parallel dim) it prints the memory
of the most loaded device (weights, gradients, optimizer state, gathered weights, activations) and the
bytes it sends per optimizer step, then suggests the layout that fits with the least communication. The
accounting is in glassmind/parallel/memory.py.
"""

from __future__ import annotations

import argparse

from glassmind.common import GlassmindError, add_config_args, config_from_args, run_main
from glassmind.parallel.memory import RankMemory, Workload, comm_bytes, numel, param_table, peak_memory
from glassmind.parallel.mesh import ParallelSpec, check_model, check_spec, divisors, parse_spec

GiB = 2**30
HEADROOM = 0.9  # leave 10% for the allocator, kernels' workspaces and the CUDA context


def candidate_layouts(cfg, devices: int, work: Workload, mp: str) -> list[ParallelSpec]:
    out = []
    for tp in divisors(devices):
        for pp in divisors(devices // tp):
            dp = devices // (tp * pp)
            zeros = [0] if dp == 1 else ([0, 1, 2, 3] if tp == pp == 1 else [0, 2, 3])
            for zero in zeros:
                spec = ParallelSpec(dp=dp, zero=zero, tp=tp, pp=pp, mp=mp)
                try:
                    check_spec(spec, devices, cfg, batch_size=work.micro_batch)
                except GlassmindError:
                    continue
                if work.global_batch % (work.micro_batch * dp):
                    continue
                out.append(spec)
    return sorted(out, key=preference)


def evaluate(cfg, spec: ParallelSpec, work: Workload, table) -> tuple[RankMemory, dict[str, float]]:
    mem, _ = peak_memory(cfg, spec, work, table)
    return mem, comm_bytes(cfg, spec, work, table)


def gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def layout_text(spec: ParallelSpec) -> str:
    """The --parallel string without the compute dtype (printed once in the header)."""
    return ",".join(p for p in str(spec).split(",") if not p.startswith("mp="))


def preference(spec: ParallelSpec) -> tuple[int, int, int]:
    """Simplest first: data parallel, then more ZeRO sharding, then tensor, then pipeline parallelism. The order
    of the usual advice (e.g. Hugging Face's Ultra-Scale Playbook, 2025): each step saves memory at a price
    the previous one does not pay (ZeRO-3 re-gathers weights every micro-batch, TP all-reduces activations
    at every layer and wants a fast intra-node link, PP leaves devices idle in its bubble)."""
    return (spec.pp, spec.tp, spec.zero)


def report(cfg, work: Workload, devices: int, memory_gb: float, specs: list[ParallelSpec], mp: str) -> str:
    table = param_table(cfg)
    n_params = sum(numel(s) for _, s, _ in table)
    width = max([len(layout_text(s)) for s in specs] + [6]) + 2
    lines = [f"model: {n_params / 1e6:.1f}M parameters ({cfg.arch}, d_model {cfg.d_model}, {cfg.total_layers} "
             f"layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}); compute dtype {mp}",
             f"work: global batch {work.global_batch} x {work.seq_len} tokens, micro batch {work.micro_batch} "
             f"per replica; {devices} device(s) x {memory_gb:g} GiB",
             "GiB per device (the most loaded one); comm: GiB one rank sends per optimizer step; bubble: idle "
             "share of a pipeline step",
             "",
             f"{'layout':<{width}}{'weights':>9}{'grads':>9}{'optim':>9}{'gather':>9}{'activ':>9}{'total':>9}"
             f"{'comm':>10}{'bubble':>8}  fits"]
    rows = []
    for spec in specs:
        mem, comm = evaluate(cfg, spec, work, table)
        fits = mem.total <= HEADROOM * memory_gb * GiB
        m = spec.n_microbatches
        bubble = (spec.pp - 1) / (m + spec.pp - 1)
        rows.append((spec, mem, sum(comm.values()), fits))
        lines.append(f"{layout_text(spec):<{width}}{gib(mem.params)}{gib(mem.grads)}{gib(mem.optimizer)}"
                     f"{gib(mem.gathered)}{gib(mem.activations)}{gib(mem.total)}{sum(comm.values()) / GiB:10.3f}"
                     f"{bubble:8.0%}  {'yes' if fits else 'NO'}")
    lines.append("")
    fitting = [r for r in rows if r[3]]
    if fitting:
        spec, mem, comm, _ = min(fitting, key=lambda r: (preference(r[0]), r[2]))
        lines.append(f"suggested: --parallel {layout_text(spec)}   ({gib(mem.total).strip()} GiB per device of "
                     f"{memory_gb:g}; the simplest layout that fits in {HEADROOM:.0%}: data parallel before ZeRO "
                     "sharding, before tensor, before pipeline parallelism)")
    elif rows:
        spec, mem, _, _ = min(rows, key=lambda r: r[1].total)
        lines.append(f"nothing fits in {HEADROOM:.0%} of {memory_gb:g} GiB; the smallest is {layout_text(spec)} at "
                     f"{gib(mem.total).strip()} GiB: lower --micro-batch (activations), add devices, or shard more")
    else:
        lines.append("no layout of these devices is valid for this model; try --layout ... to see why")
    lines.append("weights, grads and optimizer state are exact counts; activations are an estimate "
                 "(glassmind/parallel/memory.py)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from glassmind.model import ModelConfig

    p = argparse.ArgumentParser(prog="glassmind plan", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="from_run", default=None, help="take the model config from this run directory")
    p.add_argument("--devices", type=int, default=1, help="number of devices (GPUs, or CPU processes)")
    p.add_argument("--memory-gb", type=float, default=80.0, help="memory per device, GiB")
    p.add_argument("--global-batch", type=int, default=64, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward per replica")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: context length)")
    p.add_argument("--mp", default="bf16", choices=("fp32", "bf16", "fp16"), help="compute dtype")
    p.add_argument("--layout", action="append", default=None,
                   help="evaluate only this layout (repeatable), e.g. --layout dp=2,tp=2")
    model = p.add_argument_group("model (ignored with --from)")
    add_config_args(model, ModelConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    from glassmind.model import ModelConfig, load_config

    args = build_parser().parse_args(argv)
    cfg = load_config(args.from_run) if args.from_run else config_from_args(ModelConfig, args)
    for name in ("devices", "global_batch", "micro_batch"):
        if getattr(args, name) < 1:
            raise GlassmindError(f"--{name.replace('_', '-')} must be >= 1")
    work = Workload(args.global_batch, args.micro_batch, args.seq_len or cfg.context_length)
    if args.layout:
        specs = []
        for text in args.layout:
            spec = parse_spec(text, args.devices, mp=args.mp)
            check_model(spec, cfg)
            check_spec(spec, args.devices, cfg, batch_size=work.micro_batch)
            specs.append(spec)
    else:
        specs = candidate_layouts(cfg, args.devices, work, args.mp)
    print(report(cfg, work, args.devices, args.memory_gb, specs, args.mp))
    return 0

