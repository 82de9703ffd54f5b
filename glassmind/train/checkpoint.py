"""Training state: everything exact resume needs, saved so that a kill at any instant loses nothing.

A checkpoint is one folder `train_state/step_XXXXXXXX/`:

    model.safetensors       the model's tensors (tied weights stored once, aliases listed in state.json)
    optimizer.safetensors   optimizer tensors (AdamW: step, exp_avg, exp_avg_sq per parameter)
    rng.safetensors         torch CPU and CUDA generator states
    state.json              step, loader position, gradient scaler, Python and NumPy RNG states, the
                            optimizer's non-tensor state (param_groups), anything the loop adds (`extra`)
    manifest.json           written last: the files and their sizes. No manifest, no checkpoint.

It is written into a hidden temporary folder beside the final one (same filesystem, so the rename is
atomic), every file fsynced, the manifest last, then the folder is renamed to its final name and the parent
fsynced. A kill before the rename leaves only a temporary folder that `latest` ignores and the next save
removes; after the rename the checkpoint is complete. Old checkpoints are pruned to the last K, each by
deleting its manifest first, so a kill mid-prune leaves a folder `latest` skips. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from glassmind.common import GlassmindError, fsync_dir

FORMAT = 1
KILL_ENV = "GLASSMIND_TEST_KILL_IN_CHECKPOINT"
KILL_POINTS = ("model", "optimizer", "rng", "state", "manifest", "rename", "prune")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------------
# the test hook: SIGKILL this process at a chosen point inside the writer


def _maybe_die(step: int, point: str) -> None:
    """Test hook: `GLASSMIND_TEST_KILL_IN_CHECKPOINT=STEP:POINT` SIGKILLs the process just before POINT of
    the checkpoint at STEP (POINT in KILL_POINTS). It is how the tests hit the window a checkpoint is half
    written, which an outside kill reaches only by luck."""
    want = os.environ.get(KILL_ENV)
    if want and want == f"{step}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------
# files


def _write_file(path: Path, data: bytes) -> int:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses two names for one storage (tied embeddings): keep the first, alias the rest."""
    unique, aliases, first = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in first:
            aliases[name] = first[key]
        else:
            if key is not None:
                first[key] = name
            unique[name] = t.detach().to("cpu").contiguous()
    return unique, aliases


def _optimizer_split(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> (tensors for safetensors, the JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(rest["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    # JSON turned tuples (AdamW's betas) into lists; give them back their type
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_capture() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _rng_restore(tensors: dict[str, torch.Tensor], rest: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")),
                                       key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------------
# save / find / load


def save(root: str | os.PathLike, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
         scaler: Any = None, loader_state: dict | None = None, extra: dict | None = None,
         keep_last: int = 3) -> Path:
    """Write the training state after `step` optimizer steps to `root/step_XXXXXXXX/`; keep the last K.

    `model` is the unwrapped module (not a DDP/compiled wrapper), so names match on load.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    sizes: dict[str, int] = {}

    _maybe_die(step, "model")
    model_tensors, aliases = _unique_tensors(model.state_dict())
    sizes["model.safetensors"] = _write_file(tmp / "model.safetensors", st_save(model_tensors))

    _maybe_die(step, "optimizer")
    opt_tensors, opt_rest = _optimizer_split(optimizer.state_dict())
    sizes["optimizer.safetensors"] = _write_file(tmp / "optimizer.safetensors", st_save(opt_tensors))

    _maybe_die(step, "rng")
    rng_tensors, rng_rest = _rng_capture()
    sizes["rng.safetensors"] = _write_file(tmp / "rng.safetensors", st_save(rng_tensors))

    _maybe_die(step, "state")
    state = {"format": FORMAT, "step": step, "loader": loader_state or {}, "extra": extra or {},
             "aliases": aliases, "optimizer": opt_rest, "rng": rng_rest,
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    sizes["state.json"] = _write_file(tmp / "state.json", _json_bytes(state))

    _maybe_die(step, "manifest")
    _write_file(tmp / "manifest.json", _json_bytes({"format": FORMAT, "step": step, "files": sizes}))
    fsync_dir(tmp)

    _maybe_die(step, "rename")
    if final.exists():  # a leftover of an interrupted prune (no manifest); never a complete checkpoint of ours
        _remove_checkpoint(final)
    os.replace(tmp, final)
    fsync_dir(root)

    _maybe_die(step, "prune")
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        _remove_checkpoint(old)
    for orphan in _incomplete_checkpoints(root):
        _remove_checkpoint(orphan)
    return final


def _remove_checkpoint(path: Path) -> None:
    """Manifest first: from that instant `latest` no longer offers the folder, whatever remains of it."""
    try:
        (path / "manifest.json").unlink()
    except FileNotFoundError:
        pass
    fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale_temps(root: Path) -> None:
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


def _is_complete(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and _is_complete(p))


def _incomplete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not _is_complete(p))


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (a `train_state/` folder), or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         scaler: Any = None, restore_rng: bool = True) -> dict:
    """Restore model, optimizer, scaler and RNG states from a checkpoint folder.

    Returns `{"step", "loader", "extra"}`: what the loop itself must put back.
    """
    path = Path(path)
    if not _is_complete(path):
        raise GlassmindError(f"{path} is not a complete checkpoint (no manifest.json or a file of the wrong size): "
                             "resume from another one under train_state/ or start a new run")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if state.get("format") != FORMAT:
        raise GlassmindError(f"{path}: checkpoint format {state.get('format')} is not {FORMAT}")

    tensors = st_load((path / "model.safetensors").read_bytes())
    for name, target in state["aliases"].items():
        tensors[name] = tensors[target]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise GlassmindError(f"{path}/model.safetensors does not fit this model ({e}); resume with the same "
                             "model config the run was started with") from None

    if optimizer is not None:
        opt_tensors = st_load((path / "optimizer.safetensors").read_bytes())
        optimizer.load_state_dict(_optimizer_join(opt_tensors, state["optimizer"]))
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        _rng_restore(st_load((path / "rng.safetensors").read_bytes()), state["rng"])
    return {"step": state["step"], "loader": state["loader"], "extra": state["extra"]}
