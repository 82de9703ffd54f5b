"""What every training verb does to run under `--parallel`, shared by pretrain and the alignment verbs.

    spec, mesh = join(cfg.parallel, "cpu")       # parse, check, join torchrun's group (None: one process)
    with leave_at_exit(): ...                    # around the verb: every rank leaves the group, error or not
    copy = rank0_copy(model)                     # before apply_parallel changes the model in place
    pm = apply_parallel(model, spec, mesh)
    whole = whole_model(pm, copy)                # rank 0: the one-process model with the trained weights
    row = on_rank0(lambda: evaluate(whole))      # rank 0 evaluates; every rank gets its numbers (or error)

The alignment verbs evaluate by generating through the inference engine, which runs a plain model: rank 0
gathers the weights into its copy and evaluates alone while the other ranks wait for its result. The copy
costs rank 0 one more model in memory, the same a gathered checkpoint already costs it.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable, TypeVar

import torch.distributed as dist
from torch import nn

from glassmind.common import GlassmindError
from glassmind.parallel.apply import ParallelModel
from glassmind.parallel.mesh import ParallelSpec, close_distributed, init_distributed, parse_spec

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def join(text: str | None, device_type: str | None = None, **defaults) -> tuple[ParallelSpec, object]:
    """Parse and check the layout (`defaults` fill keys the text leaves out, e.g. mp=), then join torchrun's
    process group and build the mesh. Returns (spec, mesh); mesh is None for a single process. Every check
    runs before the first collective, so a wrong layout is the same error on every rank, not a hang."""
    spec = parse_spec(text, **defaults)
    return spec, init_distributed(spec, device_type)


def recipe_main(fn: Callable, cls: type, argv, *, prog: str, description: str, settings_file: str,
                renames: dict[str, str] | None = None) -> int:
    """A training verb's command line: flags from `cls` (with --resume, the run's saved settings as defaults),
    then `fn(cfg)` inside leave_at_exit (under torchrun every rank leaves the group, error or not; a no-op for
    one process), a user error as a message and exit code 2."""
    from glassmind.common import run_main
    from glassmind.train.run import parse_config

    def body(argv):
        cfg = parse_config(cls, argv, prog=prog, description=description, settings_file=settings_file,
                           renames=renames)
        with leave_at_exit():
            fn(cfg)
        return 0

    return run_main(body, argv)


@contextlib.contextmanager
def leave_at_exit():
    """Leave the process group when the verb ends: after a clean run every rank meets at a barrier first;
    after an error the barrier is skipped (a peer may be dead) and the group is destroyed at once."""
    ok = False
    try:
        yield
        ok = True
    finally:
        close_distributed(ok=ok)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def from_rank0(obj):
    """Global rank 0's `obj` on every rank (any picklable object; itself for one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[[], T]) -> T:
    """fn() run by global rank 0 alone (by the process itself when there is no group); its result, or the
    exception it raised, reaches every rank, so an error there fails all ranks at once instead of leaving
    them waiting for rank 0 until the group's timeout."""
    if not is_distributed():
        return fn()
    outcome, error = None, None
    if dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as e:  # handed to every rank, raised everywhere below
            error = e
            outcome = (False, _picklable(e))
    ok, value = from_rank0(outcome)
    if not ok:
        raise error if error is not None else value
    return value


def _picklable(e: Exception) -> Exception:
    """`e` itself if it survives pickling (to cross to the other ranks), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def rank0_copy(model: nn.Module) -> nn.Module | None:
    """A plain copy of `model` on global rank 0 (None elsewhere and for one process). Make it before
    apply_parallel, which shards and splits the model in place."""
    return copy.deepcopy(model) if is_distributed() and dist.get_rank() == 0 else None


def whole_model(pm: ParallelModel, rank0_model: nn.Module | None) -> nn.Module | None:
    """The whole model as one process has it: for one process pm.module itself; under a layout, on global
    rank 0, `rank0_model` (from rank0_copy) loaded with the gathered weights, and None on the other ranks.
    Every rank must call it (the gather is a collective)."""
    from glassmind.parallel.gather import full_model_state

    if pm.mesh is None:
        return pm.module
    state = full_model_state(pm)
    if rank0_model is None:
        return None
    rank0_model.load_state_dict(state, strict=True)
    return rank0_model


def parallel_layout(text: str, verb: str, *, parent: Path, batch_size: int, unit: str, dtype: str = "fp32"):
    """The --parallel layout of an alignment verb, checked before any process group exists, so a wrong one is
    the same clear error on every rank instead of a hang. Data parallel (dp, zero=1|2|3, fsdp) and tensor
    parallel (tp) are supported, with fp32 or bf16 compute: `dtype` (the verb's resolved --dtype) unless the
    layout names its own mp=, as pretrain's does."""
    from glassmind.model import load_config
    from glassmind.parallel.mesh import check_model, parse_spec
    from glassmind.parallel.tensor import check_attention_splits

    spec = parse_spec(text, mp=dtype)
    supported = f"{verb} runs data parallel (dp=N, zero=1|2|3, fsdp=N) and tensor parallel (tp=N) layouts"
    if spec.pp > 1:
        raise GlassmindError(f"--parallel {spec}: {supported}, not pipeline stages: drop pp (a pipeline schedule "
                             f"runs pretrain's causal-LM loss, not {verb}'s)")
    if spec.mp == "fp16":
        raise GlassmindError(f"--parallel {spec}: {verb} has no fp16 loss scaler; use mp=bf16 or mp=fp32")
    if batch_size % spec.dp:
        raise GlassmindError(f"--parallel {spec}: --batch-size {batch_size} ({unit}) does not split evenly over "
                             f"{spec.dp} data-parallel replicas: use a multiple of {spec.dp}")
    if spec.world > 1:
        config = load_config(parent)
        check_model(spec, config)
        if spec.tp > 1:
            check_attention_splits(config, spec.tp)
    return spec


def replica_rows(pm, n: int) -> slice:
    """This data-parallel replica's rows of a global batch of n (n divisible by the replicas)."""
    per = n // pm.dp_size
    return slice(pm.dp_rank * per, (pm.dp_rank + 1) * per)
