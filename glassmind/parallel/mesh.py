"""The layout of a run over many processes: a spec string, its checks, the process group and the device mesh.

A layout is written `--parallel dp=2,tp=2` (keys below). Every rank parses the same string and checks it
against the world size and the model config *before* any collective, so a wrong layout is the same clear
error on every rank instead of a hang in the first all-reduce.

    dp=N            data-parallel degree (inferred as world / (tp * pp) when absent)
    zero=K          how the data-parallel replicas share memory (Rajbhandari et al. 2020, ZeRO):
                    0 = plain DDP (every rank holds everything), 1 = optimizer state sharded
                    (ZeroRedundancyOptimizer), 2 = + gradients sharded (FSDP2, parameters kept gathered
                    from forward to backward), 3 = + parameters sharded (FSDP2, gathered per block)
    fsdp=N          shorthand for dp=N,zero=3
    tp=N            tensor-parallel degree (Megatron column/row split of attention and FFN)
    pp=N            pipeline stages (consecutive decoder blocks per stage)
    schedule=S      gpipe | 1f1b (pipeline only)
    microbatches=M  micro-batches per pipeline step (default: pp)
    mp=D            fp32 | bf16 | fp16 compute dtype (weights and optimizer state stay fp32)
    timeout=S       seconds any collective may wait before the group fails (default 600)

Ranks are laid out as a mesh with dims (pp, dp, tp), tp fastest-varying: the ranks of one TP group are
neighbours (same node), since TP talks at every layer and PP only between stages (Narayanan et al. 2021,
sec. 3.3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from glassmind.common import GlassmindError

KEYS = ("dp", "fsdp", "zero", "tp", "pp", "schedule", "microbatches", "mp", "timeout")
SCHEDULES = ("gpipe", "1f1b")
MIXED = ("fp32", "bf16", "fp16")
MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelSpec:
    dp: int = 1
    zero: int = 0
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    microbatches: int = 0     # 0: as many as stages
    mp: str = "fp32"
    timeout: float = 600.0

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def n_microbatches(self) -> int:
        return self.microbatches or self.pp

    @property
    def sharded(self) -> bool:
        """FSDP2 owns the data-parallel dim (ZeRO-2/3)."""
        return self.dp > 1 and self.zero >= 2

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(shape, names) of the dims with degree > 1, in (pp, dp, tp) order."""
        dims = [(n, getattr(self, n)) for n in MESH_DIMS if getattr(self, n) > 1]
        return tuple(d for _, d in dims), tuple(n for n, _ in dims)

    def __str__(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in MESH_DIMS if getattr(self, n) > 1] or ["dp=1"]
        if self.dp > 1 and self.zero:
            parts.append(f"zero={self.zero}")
        if self.pp > 1:
            parts += [f"schedule={self.schedule}", f"microbatches={self.n_microbatches}"]
        if self.mp != "fp32":
            parts.append(f"mp={self.mp}")
        return ",".join(parts)


def parse_spec(text: str | None, world_size: int | None = None, **defaults) -> ParallelSpec:
    """`"dp=2,tp=2"` -> ParallelSpec. An absent dp is world / (tp * pp); `defaults` fill keys the text leaves
    out (a verb passes its own mixed-precision setting as `mp=`)."""
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    raw: dict[str, str] = {}
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not value:
            raise GlassmindError(f"--parallel: {part!r} is not key=value; write e.g. 'dp=2,tp=2'")
        if key not in KEYS:
            raise GlassmindError(f"--parallel: unknown key {key!r}; the keys are {', '.join(KEYS)}")
        if key in raw:
            raise GlassmindError(f"--parallel: {key!r} given twice")
        raw[key] = value

    def integer(key: str, default: int) -> int:
        if key not in raw:
            return default
        try:
            v = int(raw[key])
        except ValueError:
            raise GlassmindError(f"--parallel: {key}={raw[key]!r} must be an integer") from None
        if v < (0 if key in ("zero", "microbatches") else 1):
            raise GlassmindError(f"--parallel: {key}={v} must be >= {0 if key in ('zero', 'microbatches') else 1}")
        return v

    if "fsdp" in raw and ("dp" in raw or "zero" in raw):
        raise GlassmindError("--parallel: fsdp=N means dp=N,zero=3; give either fsdp or dp/zero, not both")
    tp, pp = integer("tp", 1), integer("pp", 1)
    zero = 3 if "fsdp" in raw else integer("zero", 0)
    if "fsdp" in raw:
        dp = integer("fsdp", 1)
    elif "dp" in raw:
        dp = integer("dp", 1)
    else:
        if world % (tp * pp):
            raise GlassmindError(f"--parallel: tp={tp} x pp={pp} = {tp * pp} does not divide the {world} "
                                 f"processes; launch a multiple of {tp * pp} (torchrun --nproc_per_node)")
        dp = world // (tp * pp)
    schedule = raw.get("schedule", defaults.get("schedule", "1f1b")).lower()
    mp = raw.get("mp", defaults.get("mp") or "fp32").lower()
    mp = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(mp, mp)
    try:
        timeout = float(raw.get("timeout", defaults.get("timeout", 600.0)))
    except ValueError:
        raise GlassmindError(f"--parallel: timeout={raw['timeout']!r} must be a number of seconds") from None
    spec = ParallelSpec(dp=dp, zero=zero, tp=tp, pp=pp, schedule=schedule,
                        microbatches=integer("microbatches", 0), mp=mp, timeout=timeout)
    check_spec(spec, world)
    return spec


def check_spec(spec: ParallelSpec, world: int, model_config=None, batch_size: int | None = None) -> None:
    """Every layout error a user can make, raised identically on every rank before any collective.

    `model_config` (a ModelConfig) adds the checks that depend on the model; `batch_size` (the batch one
    data-parallel rank sees per step) the ones that depend on the batch.
    """
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise GlassmindError(f"--parallel {spec}: {msg}")

    need(spec.world == world, f"dp={spec.dp} x tp={spec.tp} x pp={spec.pp} = {spec.world} processes, but "
                              f"{world} were launched; launch torchrun --nproc_per_node={spec.world} or change "
                              "the degrees so their product is the process count")
    need(spec.zero in (0, 1, 2, 3), f"zero={spec.zero} must be 0, 1, 2 or 3")
    need(spec.schedule in SCHEDULES, f"schedule={spec.schedule!r} must be one of {', '.join(SCHEDULES)}")
    need(spec.mp in MIXED, f"mp={spec.mp!r} must be one of {', '.join(MIXED)}")
    need(spec.timeout > 0, "timeout must be > 0 seconds")
    need(not (spec.zero == 1 and (spec.pp > 1 or spec.tp > 1)),
         "zero=1 (ZeroRedundancyOptimizer) combines with neither pp nor tp here; use zero=2 or zero=3 "
         "(FSDP2) to shard the optimizer state of those layouts")
    if spec.pp > 1:
        need(spec.schedule != "1f1b" or spec.n_microbatches >= spec.pp,
             f"1f1b needs at least as many microbatches as stages ({spec.pp}); set microbatches>={spec.pp}")
    if model_config is not None:
        check_model(spec, model_config)
    if batch_size is not None and spec.pp > 1:
        need(batch_size % spec.n_microbatches == 0,
             f"the per-replica batch {batch_size} does not split into {spec.n_microbatches} microbatches; "
             "make the batch a multiple of microbatches")


def check_model(spec: ParallelSpec, cfg) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise GlassmindError(f"--parallel {spec}: {msg}")

    if spec.tp > 1:
        need(cfg.n_heads % spec.tp == 0,
             f"tp={spec.tp} does not divide the model's {cfg.n_heads} attention heads: each rank must hold "
             f"whole heads; choose tp among {divisors(cfg.n_heads)}")
        need(cfg.n_kv_heads % spec.tp == 0,
             f"tp={spec.tp} does not divide the model's {cfg.n_kv_heads} key/value heads: choose tp among "
             f"{divisors(cfg.n_kv_heads)}")
        need(cfg.d_ff % spec.tp == 0, f"tp={spec.tp} does not divide the FFN width d_ff={cfg.d_ff}")
    if spec.pp > 1:
        need(cfg.arch == "decoder", f"pipeline parallelism splits decoder-only models; this one is {cfg.arch}")
        need(spec.pp <= cfg.n_layers,
             f"pp={spec.pp} stages but the model has only {cfg.n_layers} layers: every stage needs at least "
             f"one block; use pp<={cfg.n_layers}")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------------------------------
# process group and mesh


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _group_options(backend: str, timeout: timedelta):
    """Options that carry the timeout into the mesh's sub-groups (they default to 30 min otherwise)."""
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
    else:
        opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    return opts


def init_distributed(spec: ParallelSpec, device_type: str | None = None):
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR in the environment) and build
    the device mesh. Returns the DeviceMesh, or None for a single process. device_type: "cuda" (NCCL, one GPU
    per process: cuda:LOCAL_RANK) or "cpu" (gloo); default cuda when there is one."""
    if spec.world == 1:
        return None
    if "RANK" not in os.environ:
        raise GlassmindError(f"--parallel {spec} needs {spec.world} processes: launch with "
                             f"torchrun --nproc_per_node={spec.world} -m glassmind ...")
    device_type = device_type or default_device_type()
    init_process_group(spec.timeout, device_type)
    return build_mesh(spec, device_type)


def init_process_group(timeout_s: float, device_type: str | None = None) -> None:
    """The default group: NCCL for GPUs, gloo for CPUs, failing after timeout_s instead of waiting forever."""
    if dist.is_initialized():
        return
    device_type = device_type or default_device_type()
    device = None
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device)


def build_mesh(spec: ParallelSpec, device_type: str | None = None):
    """The (pp, dp, tp) mesh over the default group. Each dim's sub-groups get `spec.timeout` too (they would
    default to 30 minutes): a rank that stops answering fails its peers after that long."""
    from torch.distributed.device_mesh import init_device_mesh

    backend = dist.get_backend()
    shape, names = spec.mesh_shape()
    override = {name: (backend, _group_options(backend, timedelta(seconds=spec.timeout))) for name in names}
    return init_device_mesh(device_type or default_device_type(), shape, mesh_dim_names=names,
                            backend_override=override)


def close_distributed(*, ok: bool = True) -> None:
    """Leave the process group. After a clean run every rank waits at a barrier first, so no rank tears down
    a group another is still using; after an error the barrier is skipped (the peers may be dead)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if ok:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def mesh_coordinate(mesh, dim: str) -> tuple[int, int]:
    """(this rank's index, degree) along a mesh dim; (0, 1) when the dim is absent."""
    if mesh is None or mesh.mesh_dim_names is None or dim not in mesh.mesh_dim_names:
        return 0, 1
    return mesh[dim].get_local_rank(), mesh[dim].size()
