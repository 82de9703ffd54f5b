"""What each rank runs for tests/test_parallel_align.py (launched by glassmind.parallel.launch.torchrun).

    python tests/align_worker.py OUT BASE SFT_REF BASE3 PREFS

One process group serves every job (torchrun costs seconds per start, and a process cannot join a second group
after leaving one): each job calls a verb's function as `main` would, minus leaving the group, and the verb
builds its own mesh. A job that raises is recorded in OUT/<job>/error_<rank>.txt and the next job runs.
BASE is a tiny base run, SFT_REF the one-process SFT run (the parent of reward and dpo, and a checkpoint to
resume under a layout), BASE3 a base whose 3 heads do not split over tp=2, PREFS the reward model's rankings.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from glassmind.parallel.mesh import init_process_group
from glassmind.recipes import dpo, reward, sft
from glassmind.train import run as run_lib

TIMEOUT_S = 60
# (dpo's layouts run through the command line instead: tests/test_parallel_align.py, test_dpo_...)
VERBS = {"sft": (sft.SFTConfig, sft.sft, sft.SETTINGS, {"parent": "--from"}),
         "reward": (reward.RewardConfig, reward.train_reward, reward.SETTINGS, {"parent": "--from"}),
         "dpo": (dpo.DPOConfig, dpo.dpo, dpo.SETTINGS, {})}


# Every job computes in fp32 unless it says otherwise (--dtype auto would pick bf16 on a CPU with AMX and fp32 on
# one without; the layouts are compared with a one-process run at fp32's tolerances). A later --dtype wins.
def sft_args(parent, out, *extra) -> list[str]:
    return ["--from", str(parent), "--out", str(out), "--steps", "4", "--batch-size", "4", "--n-examples", "40",
            "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "0", "--eval-per-task", "1", "--ckpt-every", "2",
            "--threads", "1", "--no-progress", "--dtype", "fp32", *extra]


def reward_args(parent, out, prefs, *extra) -> list[str]:
    return ["--from", str(parent), "--out", str(out), "--data", str(prefs), "--val-fraction", "0.3",
            "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "0",
            "--ckpt-every", "2", "--threads", "1", "--no-progress", "--dtype", "fp32", *extra]


def dpo_args(parent, out, *extra) -> list[str]:
    return ["--policy", str(parent), "--out", str(out), "--steps", "4", "--batch-size", "4", "--n-prefs", "8",
            "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "0", "--eval-per-task", "1",
            "--final-eval-per-task", "1", "--ckpt-every", "2", "--threads", "1", "--no-progress", "--dtype", "fp32", *extra]


def layout(text: str) -> list[str]:
    return ["--parallel", f"{text},timeout={TIMEOUT_S}"]


def run(verb: str, argv: list[str]) -> None:
    cls, fn, settings, renames = VERBS[verb]
    fn(run_lib.parse_config(cls, argv, prog=f"glassmind {verb}", description=verb, settings_file=settings,
                        renames=renames))


def cut_copy(src: Path, dst: Path, step: int, settings: str = sft.SETTINGS) -> None:
    """Run `src` moved to `dst` (its settings name the new place) as a kill after checkpoint `step` would have
    left it: the later checkpoints are gone."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "train_state").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    saved = json.loads((dst / settings).read_text())
    (dst / settings).write_text(json.dumps({**saved, "out": str(dst)}))


def cut_to_step(src: Path, dst: Path, step: int) -> None:
    if dist.get_rank() == 0:
        cut_copy(src, dst, step)
    dist.barrier()


def jobs(out: Path, base: Path, sft_ref: Path, base3: Path, prefs: Path):
    """(name, verb, argv, setup) in order; setup runs on every rank before the job."""
    yield "sft-dp2", "sft", sft_args(base, out / "sft-dp2", *layout("dp=2")), None
    yield "sft-fsdp2", "sft", sft_args(base, out / "sft-fsdp2", *layout("fsdp=2")), None
    yield "sft-tp2", "sft", sft_args(base, out / "sft-tp2", *layout("tp=2")), None
    # resume under another layout: dp=2's step-2 checkpoint under tp=2; the one-process one under zero=2
    yield ("sft-dp2-resumed-tp2", "sft", sft_args(base, out / "sft-dp2-resumed-tp2", "--resume", *layout("tp=2")),
           lambda: cut_to_step(out / "sft-dp2", out / "sft-dp2-resumed-tp2", 2))
    yield ("sft-ref-resumed-zero2", "sft",
           sft_args(base, out / "sft-ref-resumed-zero2", "--resume", *layout("dp=2,zero=2")),
           lambda: cut_to_step(sft_ref, out / "sft-ref-resumed-zero2", 2))
    yield "reward-zero1", "reward", reward_args(sft_ref, out / "reward-zero1", prefs, *layout("dp=2,zero=1")), None
    yield "sft-fsdp2-bf16", "sft", sft_args(base, out / "sft-fsdp2-bf16", *layout("fsdp=2"), "--dtype", "bf16"), None
    # wrong layouts: the same clear error on every rank, before any work
    yield "err-pp", "sft", sft_args(base, out / "err-pp", *layout("pp=2")), None
    yield ("err-batch", "reward", reward_args(sft_ref, out / "err-batch", prefs, "--batch-size", "3", *layout("dp=2")),
           None)
    yield "err-heads", "dpo", dpo_args(base3, out / "err-heads", *layout("tp=2")), None
    # an error in what rank 0 does alone (evaluation, writing files) reaches every rank at once
    yield "rank0-error", None, [], None


def fail_on_rank0() -> None:
    from glassmind.common import GlassmindError
    from glassmind.parallel.runtime import on_rank0

    def boom():
        raise GlassmindError(f"boom on rank {dist.get_rank()}")

    on_rank0(boom)


def main(argv: list[str]) -> int:
    out, base, sft_ref, base3, prefs = (Path(a) for a in argv[:5])
    out.mkdir(parents=True, exist_ok=True)
    init_process_group(TIMEOUT_S, "cpu")
    try:
        for name, verb, args, setup in jobs(out, base, sft_ref, base3, prefs):
            try:
                if setup is not None:
                    setup()
                if verb is None:
                    fail_on_rank0()
                else:
                    run(verb, args)
            except Exception as e:  # record it and go on: one broken job must not hide the others
                folder = out / name
                folder.mkdir(parents=True, exist_ok=True)
                text = str(e) if type(e).__name__ == "GlassmindError" else traceback.format_exc()
                (folder / f"error_{dist.get_rank()}.txt").write_text(text)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
