"""Model files in a run directory: `config.json` (the ModelConfig) and `model.safetensors` (the weights).

Writes are atomic (temp file in the same folder, fsync, rename: a kill mid-save leaves the old files).
Reads refuse pickle (`.bin`/`.pt`, which can run code) unless the caller opts in, and then use
`torch.load(weights_only=True)`. Every mismatch is an error naming the file and what differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from glassmind.common import GlassmindError, atomic_path, atomic_write_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.bin")


def save_model(model, run_dir: str | os.PathLike) -> Path:
    """`config.json` + `model.safetensors` of `model` (a Transformer, or anything with .config and a state_dict)."""
    from safetensors.torch import save_file

    from glassmind import __version__

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "glassmind": __version__})
    doc = {"glassmind_version": __version__, **model.config.to_dict()}
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")
    return run_dir


def load_config(run_dir: str | os.PathLike):
    from glassmind.model.transformer import ModelConfig

    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise GlassmindError(f"{path} not found: is {run_dir} a glassmind run directory? "
                             "(convert Hugging Face models with `glassmind convert --from-hf`)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GlassmindError(f"{path} is not valid JSON ({e}); the file is corrupt") from None
    doc.pop("glassmind_version", None)
    return ModelConfig.from_dict(doc)


def read_state_dict(run_dir: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    run_dir = Path(run_dir)
    path = run_dir / WEIGHTS_FILE
    if path.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise GlassmindError(f"{path} is corrupt or truncated ({e}); restore it from a checkpoint "
                                 "or re-run the stage that wrote it") from None
    pickled = [run_dir / n for n in PICKLE_FILES if (run_dir / n).exists()]
    if pickled:
        if not allow_pickle:
            raise GlassmindError(f"{pickled[0]} is a pickle file, which can run arbitrary code when loaded; "
                                 "refusing. If you trust it, pass allow_pickle=True (--allow-pickle), or "
                                 "convert it to safetensors")
        return torch.load(pickled[0], map_location="cpu", weights_only=True)
    raise GlassmindError(f"no {WEIGHTS_FILE} in {run_dir}")


def load_model(run_dir: str | os.PathLike, *, allow_pickle: bool = False, device: str | torch.device = "cpu"):
    """The model of a run directory, in eval mode (dropout off), on `device`."""
    from glassmind.model.transformer import Transformer

    cfg = load_config(run_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = read_state_dict(run_dir, allow_pickle=allow_pickle)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        where = Path(run_dir) / WEIGHTS_FILE
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        raise GlassmindError(f"{where} does not match {Path(run_dir) / CONFIG_FILE}: " + ", ".join(parts))
    model.load_state_dict(state, assign=True)
    model.rebuild_buffers()
    return model.to(device).eval()  # like from_pretrained: training verbs call .train() themselves

