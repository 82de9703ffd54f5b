"""Things every part of glassmind needs: device and dtype, seeding, rank helpers, run directories,
atomic writes, and turning a dataclass config into command-line flags.

Nothing here imports the rest of glassmind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import torch

# torch and numpy are imported inside the functions that need them: `glassmind tokenizer ...` and the
# corpus readers then start in a fraction of a second instead of paying for torch's import.


class GlassmindError(Exception):
    """An error the user can cause and fix (bad config, bad data, bad request).

    Verbs catch it at the top and print its message without a traceback: the message must name the fix.
    """


# ----------------------------------------------------------------------------------------------------
# device, dtype, seeding


def pick_device(name: str = "auto") -> "torch.device":
    """`auto` picks cuda, then mps, then cpu; anything else is passed to torch.device."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}


def parse_dtype(name: "str | torch.dtype") -> "torch.dtype":
    import torch

    if isinstance(name, torch.dtype):
        return name
    try:
        return getattr(torch, DTYPE_NAMES[name])
    except KeyError:
        raise GlassmindError(f"unknown dtype {name!r}: use one of fp32, bf16, fp16") from None


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------------------------------
# ranks (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain process is rank 0 of 1)


def _dist_ready() -> bool:
    torch = sys.modules.get("torch")  # if torch was never imported, no process group can exist
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    if _dist_ready():
        import torch

        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if _dist_ready():
        import torch

        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only, flushed, so logs of several ranks do not interleave."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------------------------------
# files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so a crash at any instant leaves either the old file or the new one.

    Temp file in the same folder (rename is atomic only within a filesystem), fsync the file, rename over
    the final name, then fsync the folder so the rename itself survives a power cut (see atomic_path).
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path` for a writer that wants a file name (safetensors, numpy);
    on success fsync it and rename it over `path`; on failure remove it. Same guarantee as
    atomic_write_bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """One line per record, flushed: a reader (or a crash) never sees half a record except the last."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a killed writer
    return out


def run_dir(path: str | os.PathLike, *, create: bool = True) -> Path:
    """A run directory (`runs/<name>/`): the unit a person handles. See DESIGN.md, 'How data flows'."""
    path = Path(path)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------
# config dataclass <-> command-line flags


def _flag_type(tp: Any):
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else str
    return tp


def config_field(default: Any, help: str, **kw: Any) -> Any:
    """A config dataclass field with its flag help (`choices=` and the like go in the metadata too); a list
    default becomes a default_factory, so instances never share it."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = ()) -> None:
    """Add one `--field-name` flag per dataclass field; the help text is the field's `help` metadata."""
    hints = typing.get_type_hints(cls)
    skip = set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_)
        elif typing.get_origin(tp) in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            parser.add_argument(flag, dest=f.name, nargs="*", type=inner, default=default, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=tp if tp in (int, float, str) else str,
                                default=default, choices=choices,
                                help=f"{help_} (default: {default})" if help_ else f"(default: {default})")


def config_from_args(cls: type, ns: argparse.Namespace, **overrides: Any):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(overrides)
    return cls(**values)


def run_main(fn, argv: list[str] | None) -> int:
    """Run a verb's body; a GlassmindError becomes a clear message and exit code 2, not a traceback."""
    try:
        return int(fn(argv) or 0)
    except GlassmindError as e:
        print(f"glassmind: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("glassmind: interrupted", file=sys.stderr)
        return 130
