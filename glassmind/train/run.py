"""The ritual around every training loop, written once: every recipe (pretrain, sft, reward, ppo, dpo, grpo)
goes through it, so they cannot drift apart.

    cfg = parse_config(SFTConfig, argv, prog=..., settings_file="sft.json")   # flags; --resume reads the saved ones
    setup_torch(cfg.threads)                                # threads, deterministic kernels (exact resume)
    run = Run(cfg, "sft.json")                              # fresh run dir, or the same run resumed: never clobber
    run.start()                                             # writes the settings (rank 0), once every check passed
    step, info = run.resume(pm, optimizer)                  # newest complete checkpoint, metrics truncated to it
    while step < cfg.steps:
        ... loss.backward()
        outcome = run.optimizer_step(pm, optimizer, loss, step=step, grad_clip=cfg.grad_clip)
        step += 1
        if run.due(cfg.ckpt_every, step, cfg.steps): run.checkpoint(pm, step, optimizer=optimizer)
    if run.needs_final_checkpoint(step): run.checkpoint(pm, step, optimizer=optimizer)

`pm` is what the loop trains: a `glassmind.parallel.ParallelModel` (one process or a layout; recipes make it
with `apply_parallel`). This file calls only its methods (`clip_grad_norm_`, `save_state`, `load_state`), so the
nouns here know nothing of parallelism and import nothing above common, data and model.

`optimizer_step` is the one place a step happens: unscale (fp16), clip, the non-finite guard (stop before the
update, or skip it with --skip-nonfinite), step, zero the gradients, and the loss scaler's own skip.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from glassmind.common import (GlassmindError, add_config_args, atomic_write_json, config_field, config_from_args,
                              dtype_name, is_rank0, print0, resolve_dtype, world_size)
from glassmind.train import checkpoint, metrics


# ======================================================================================================
# the settings every training verb shares
# ======================================================================================================


@dataclass
class RunSettings:
    """What every training verb takes besides its own dials. A verb's config extends it (and may give a field
    another default by declaring it again)."""

    out: str = config_field("runs/run", "run directory to write")
    resume: bool = config_field(False, "continue the run in --out from its newest complete checkpoint")
    ckpt_every: int = config_field(100, "checkpoint every N steps (and always at the end)")
    keep_last: int = config_field(2, "checkpoints to keep")
    skip_nonfinite: bool = config_field(False, "skip a step whose loss or gradient norm is NaN/inf instead of "
                                               "stopping before the update")
    threads: Optional[int] = config_field(None, "CPU threads for torch (default: torch's choice)")
    progress: bool = config_field(True, "show progress")
    dtype: str = config_field("auto", "compute dtype: auto (bf16 where this machine computes it natively: a GPU "
                                      "with bf16, a CPU with AMX or AVX512-BF16; fp32 elsewhere), fp32 or bf16 "
                                      "(bf16 autocast; the weights and optimizer state stay fp32)")


PARALLEL_HELP = ("layout over torchrun's processes: dp=N, zero=1|2|3, fsdp=N, tp=N, mp=bf16, e.g. fsdp=2 or dp=2,tp=2 "
                 "(empty: data parallel over all; no pp)")


@dataclass
class ParallelRunSettings(RunSettings):
    """The settings of a verb that lays itself out over torchrun's processes (glassmind.parallel)."""

    parallel: str = config_field("", PARALLEL_HELP)


# Fields a resumed run may change: they do not alter what is computed. A verb adds its own (pretrain: --steps,
# its eval cadence, ...).
RESUME_MAY_CHANGE = frozenset({"resume", "ckpt_every", "keep_last", "skip_nonfinite", "threads", "progress",
                               "parallel"})  # checkpoints are layout-free
# Of those, the ones that change the rounding of what is computed (another reduction order, a fused kernel, a
# compiled graph): a run resumed with one of them changed continues correctly, but no longer bit for bit as the
# uninterrupted run would have. Said at resume, never silent.
CHANGES_ROUNDING = frozenset({"threads", "parallel", "compile", "fused_loss"})


def parse_config(cls: type, argv: Sequence[str] | None, *, prog: str, description: str, settings_file: str,
                 renames: dict[str, str] | None = None):
    """Flags from the dataclass `cls`; `renames` maps a field to its flag (sft's `parent` is `--from`). With
    --resume the run's saved settings are the defaults, so `--out RUN --resume` is enough; except the layout
    (--parallel), which belongs to the launch: a run resumes under whatever layout it is given."""
    renames = renames or {}
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=f"Resume a killed or finished run with: {prog} --out RUN --resume")
    add_config_args(parser, cls, skip=renames)
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, flag in renames.items():
        parser.add_argument(flag, dest=name, default=hints[name].default, help=hints[name].metadata.get("help"))
    ns = parser.parse_args(argv)
    saved = Path(ns.out) / settings_file
    if ns.resume and saved.exists():
        settings = json.loads(saved.read_text(encoding="utf-8"))
        settings.pop("parallel", None)
        parser.set_defaults(**{k: v for k, v in settings.items() if k in hints})
        ns = parser.parse_args(argv)
    return config_from_args(cls, ns)


def resolve_run_dtype(cfg: Any, settings_file: str, device: "str | torch.device" = "cpu", *,
                      allowed: Sequence[str] = ("fp32", "bf16", "fp16")) -> tuple[Any, str]:
    """`--dtype auto` -> the dtype this machine computes fast (common.resolve_dtype), written into the config so
    that the run's settings file and card say what ran: (cfg with dtype fp32|bf16|fp16, the one-line reason).
    A resumed run keeps the dtype it started with (auto on another machine could choose differently, and the
    run would no longer continue as it began). A layout that names its own `mp=` (the older spelling, still
    taken) decides under auto and must agree with an explicit --dtype. `allowed`: what the verb computes in."""
    saved_path = Path(cfg.out) / settings_file
    mp = _layout_mp(getattr(cfg, "parallel", "") or "")
    if cfg.dtype == "auto" and cfg.resume and saved_path.exists():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        if saved.get("dtype", "auto") != "auto":
            return (dataclasses.replace(cfg, dtype=saved["dtype"]),
                    saved.get("dtype_reason", f"dtype auto -> {saved['dtype']}: the resumed run's"))
    if mp is not None and cfg.dtype not in ("auto", mp):
        raise GlassmindError(f"--dtype {cfg.dtype} and --parallel mp={mp} disagree: give the compute dtype once "
                             f"(--dtype {cfg.dtype}, and drop mp= from --parallel)")
    if mp is not None:
        dtype, _ = resolve_dtype(mp, device)  # warns where bf16 is not native here
        reason = f"dtype {dtype_name(dtype)}: from --parallel mp={mp}"
    else:
        dtype, reason = resolve_dtype(cfg.dtype, device)
    name = dtype_name(dtype)
    if name not in allowed:
        raise GlassmindError(f"--dtype {cfg.dtype}: this verb computes in {' or '.join(allowed)}, not {name}")
    return dataclasses.replace(cfg, dtype=name), reason


def _layout_mp(layout: str) -> str | None:
    """The mp= of a --parallel layout text, if it names one (glassmind.parallel checks the rest)."""
    for part in layout.replace(" ", "").split(","):
        key, _, value = part.partition("=")
        if key == "mp" and value:
            return value
    return None


def setup_torch(threads: int | None, *, deterministic: bool = True, compile: bool = False) -> None:
    """Threads, and deterministic kernels (exact resume). warn_only: a few CUDA kernels have no deterministic
    version; on CPU every op used here has one."""
    if threads:
        torch.set_num_threads(threads)
    if compile:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)  # also sets inductor's flag
    else:  # the same switch without importing torch._inductor just to set its flag (seconds of startup)
        torch._C._set_deterministic_algorithms(deterministic, warn_only=True)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_run_dir(cfg: Any, settings_file: str, may_change: frozenset = RESUME_MAY_CHANGE) -> Path:
    """A fresh run directory, or the same run resumed with its own settings: never clobber another run.
    Checks only; `settings_file` is the verb's saved config, `may_change` the fields a resume may alter."""
    out = Path(cfg.out)
    saved_path = out / settings_file
    if cfg.resume:
        if not saved_path.exists():
            raise GlassmindError(f"--resume: {out} holds no {settings_file}, so there is no run to resume; "
                                 "drop --resume to start one")
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        now = dataclasses.asdict(cfg)
        diff = {k: (saved.get(k), v) for k, v in now.items() if k not in may_change and saved.get(k) != v}
        if diff:
            pretty = ", ".join(f"{k}: run has {a!r}, you gave {b!r}" for k, (a, b) in diff.items())
            raise GlassmindError(f"--resume with settings that change the run ({pretty}); resume with the "
                                 "run's own settings (just --out and --resume) or start a new run")
        rounding = sorted(k for k in CHANGES_ROUNDING & set(now) if k in saved and saved[k] != now[k])
        if rounding:
            print0("note: resumed with " + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in rounding)
                   + ": the run continues correctly, but no longer bit for bit as it would have uninterrupted "
                   "(another reduction order or kernel rounds differently)")
    elif saved_path.exists() or (out / "train_state").exists():
        raise GlassmindError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    return out


def refuse_unlaid_processes(verb: str) -> None:
    """torchrun started several processes but this verb did not lay itself out over them (ppo and grpo run in
    one process): N copies would write the same run directory. Say so instead."""
    laid = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size() > 1 and not laid:
        raise GlassmindError(f"glassmind {verb} runs in one process, but torchrun started {world_size()}: run it "
                             "without torchrun. (pretrain, sft, reward and dpo take --parallel under torchrun; ppo "
                             "and grpo roll out through the inference engine on the whole model and do not)")


# ======================================================================================================
# the run
# ======================================================================================================


class NonFiniteError(GlassmindError):
    """A NaN/inf loss or gradient norm: the loop stopped before the update, the weights are untouched."""


@dataclass
class StepOutcome:
    grad_norm: float
    skipped: bool                   # no update: a non-finite step skipped on request, or the fp16 scaler's skip
    loss_scale: float | None = None  # fp16: the scale the step ran at


class Run:
    """One run directory and the ritual around its loop. `may_change`: fields a resume may alter (see
    RESUME_MAY_CHANGE). Under torchrun every rank makes one; only rank 0 writes."""

    def __init__(self, cfg: Any, settings_file: str, may_change: frozenset = RESUME_MAY_CHANGE):
        self.cfg, self.settings_file = cfg, settings_file
        refuse_unlaid_processes(Path(settings_file).stem)
        self.out = check_run_dir(cfg, settings_file, may_change)
        self.log = metrics.MetricsLog(self.out)
        self.last_checkpoint: Path | None = None

    def start(self, extra: dict | None = None) -> Path:
        """Write the settings (and `extra` facts beside them, e.g. why a dtype was chosen): call it once every
        check that can refuse the run has passed, so a refused run leaves nothing behind. Every rank checks
        before rank 0 writes (no rank may meet a new settings file while it still checks for an existing run)."""
        _barrier()
        if is_rank0():
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / self.settings_file, {**dataclasses.asdict(self.cfg), **(extra or {})})
        _barrier()
        return self.out

    def resume(self, pm, optimizer, *, scaler: Any = None) -> tuple[int, dict]:
        """(step, {"loader", "extra"}) from the newest complete checkpoint under --resume, else (0, {}).
        Metrics rows a killed run wrote after that checkpoint are dropped: they are computed again."""
        latest = checkpoint.latest(self.out / "train_state") if self.cfg.resume else None
        step, info = 0, {"loader": {}, "extra": {}}
        if latest is not None:
            info = pm.load_state(latest, optimizer=optimizer, scaler=scaler)
            step = info["step"]
            print0(f"resumed from {latest} (step {step})")
        elif self.cfg.resume:
            print0(f"no complete checkpoint in {self.out / 'train_state'}: starting {self.out} from step 0")
        if self.cfg.resume:
            self.log.truncate_after(step)
        self.last_checkpoint = latest
        return step, info

    def optimizer_step(self, pm, optimizer, loss: float, *, step: int, grad_clip: float,
                       scaler: Any = None) -> StepOutcome:
        """Unscale (fp16), clip the global gradient norm, refuse a non-finite loss or gradient before the
        update (or skip it with --skip-nonfinite), step, zero the gradients. `loss` is the step's loss as a
        number (on every rank the same), `step` the number of steps done before this one."""
        scaling = scaler is not None and scaler.is_enabled()
        if scaling:
            scaler.unscale_(optimizer)
        grad_norm = pm.clip_grad_norm_(grad_clip if grad_clip > 0 else math.inf)
        # under fp16 an inf gradient is the loss scaler's business (it skips the step and lowers the scale)
        bad = not math.isfinite(loss) or (not math.isfinite(grad_norm) and not scaling)
        if bad and not self.cfg.skip_nonfinite:
            self.log.log({"step": step + 1, "event": "nonfinite", "loss": loss, "grad_norm": grad_norm})
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"step {step + 1}: loss {loss} / gradient norm {grad_norm} is not finite. Stopped before the "
                f"update; the weights are untouched and the last good checkpoint is "
                f"{self.last_checkpoint or 'none (no checkpoint yet)'}. Lower --lr, lengthen the warmup, use "
                "fp32, or pass --skip-nonfinite; then --resume")
        if bad:
            print0(f"step {step + 1}: non-finite loss/gradient, update skipped (--skip-nonfinite)")
        elif scaling:
            scaler.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scale = None
        if scaling:
            scale = scaler.get_scale()
            scaler.update()
            if scaler.get_scale() < scale:  # the scaler found inf gradients and skipped the step
                bad = True
                print0(f"step {step + 1}: inf/NaN gradients at loss scale {scale:g}: update skipped, scale lowered")
        return StepOutcome(grad_norm, bad, scale)

    @staticmethod
    def due(every: int, step: int, total: int) -> bool:
        """Whether a cadence (eval, checkpoint) fires after `step` steps; the end has its own call."""
        return bool(every) and step % every == 0 and step < total

    def checkpoint(self, pm, step: int, *, optimizer, scaler: Any = None, loader_state: dict | None = None,
                   extra: dict | None = None) -> Path:
        """The train state after `step` steps (every rank calls it; rank 0 writes the one-process format)."""
        self.last_checkpoint = pm.save_state(self.out / "train_state", step, optimizer=optimizer, scaler=scaler,
                                             loader_state=loader_state, extra=extra, keep_last=self.cfg.keep_last)
        return self.last_checkpoint

    def needs_final_checkpoint(self, step: int) -> bool:
        return self.last_checkpoint is None or self.last_checkpoint.name != checkpoint.step_dir_name(step)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
