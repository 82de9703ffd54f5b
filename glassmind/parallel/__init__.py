"""Scale-out applied from outside the model: data (DDP), sharded (ZeRO-1/2/3 with FSDP2), tensor and pipeline
parallelism on a device mesh, launched by torchrun. `glassmind plan` shows what each layout costs.

    spec = parse_spec("dp=2,tp=2")            # mesh.py: the layout, checked before any collective
    mesh = init_distributed(spec)             # join torchrun's group (gloo on CPU, NCCL on GPU)
    pm = apply_parallel(model, spec, mesh)    # apply.py: pipeline split, TP, then DDP or FSDP
    pm.save_state(root, step, optimizer=opt)   # gather.py: gathered, one-process format
"""

from glassmind.parallel.apply import ParallelModel, apply_parallel, distributed, single_process
from glassmind.parallel.mesh import ParallelSpec, close_distributed, init_distributed, parse_spec

__all__ = ["ParallelModel", "ParallelSpec", "apply_parallel", "close_distributed", "distributed",
           "init_distributed", "parse_spec", "single_process"]
