"""Things every part of glassmind needs: device and dtype, seeding, rank helpers, run directories,
atomic writes, and turning a dataclass config into command-line flags.

Nothing here imports the rest of glassmind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
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


# ----------------------------------------------------------------------------------------------------
# the compute dtype a machine computes fast (`--dtype auto`)
#
# bf16 autocast halves the bytes a matmul reads, but it is only faster where the hardware multiplies bf16
# natively: CUDA GPUs from Ampere on, and CPUs with AMX (Sapphire Rapids on) or AVX512-BF16 (Cooper Lake,
# Zen 4). Everywhere else (AVX2 laptops and servers, older Xeons, most ARM builds of torch) a bf16 matmul is
# emulated: measured on a 2-core AVX2 EPYC, a (2048 x 128) @ (128 x 512) product takes 66 ms in bf16 against
# 12 ms in fp32, and pre-training ran at ~900 tokens/s in bf16 against ~10,000 in fp32 (issue 13).

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
# the timed probe calls bf16 native when a bf16 product takes at most this fraction of the fp32 one: autocast
# adds casts around every product, so bf16 must be clearly faster (AMX: ~0.2x; emulated AVX2: 5-150x)
PROBE_NATIVE_BELOW = 0.8


@dataclasses.dataclass(frozen=True)
class CpuFacts:
    """What the CPU says about itself. flags is None where /proc/cpuinfo cannot be read (macOS, Windows)."""

    model: str
    capability: str              # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, DEFAULT, ...
    mkldnn_bf16: bool            # torch.ops.mkldnn._is_mkldnn_bf16_supported(): oneDNN has a bf16 kernel
    flags: "frozenset[str] | None"


@dataclasses.dataclass(frozen=True)
class Bf16Support:
    """Whether this CPU computes bf16 natively, why, and (when the timed probe ran) how much slower a bf16
    matmul was than an fp32 one (t_bf16 / t_fp32: 0.2 on AMX, 5 or more where bf16 is emulated)."""

    native: bool
    why: str
    slowdown: "float | None" = None


def _cpuinfo() -> "tuple[str | None, frozenset[str] | None]":
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    model = flags = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:  # x86 / ARM
            flags = frozenset(value.split())
    return model, flags


@functools.lru_cache(maxsize=None)
def cpu_facts() -> CpuFacts:
    """This process's CPU (cached: the capability cannot change while torch runs)."""
    import platform

    import torch

    model, flags = _cpuinfo()
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # a private op: a build without oneDNN, or a future torch without it
        mkldnn_bf16 = False
    return CpuFacts(model=model or platform.processor() or platform.machine() or "unknown CPU",
                    capability=torch.backends.cpu.get_cpu_capability(), mkldnn_bf16=mkldnn_bf16, flags=flags)


def bf16_verdict(facts: CpuFacts) -> "tuple[bool | None, str]":
    """Native bf16 from the capability alone: True, False, or None where the facts disagree or are missing
    (then a timed probe decides). Pure, so each case is testable with made-up facts."""
    if not facts.mkldnn_bf16:
        return False, f"this CPU ({facts.capability}) has no native bf16"
    if facts.flags is None:
        return None, f"this CPU ({facts.capability}) does not list its features"
    hw = [f for f in ("amx_bf16", "avx512_bf16") if f in facts.flags]
    if not hw:
        if any(f in facts.flags for f in ("bf16", "svebf16")):  # ARM's BF16 extension: kernels vary by build
            return None, f"this CPU ({facts.capability}) has ARM bf16 instructions"
        return False, f"this CPU ({facts.capability}) has no native bf16"
    if facts.capability.startswith("AVX512"):
        return True, f"this CPU ({facts.capability}, {'AMX' if hw[0] == 'amx_bf16' else 'AVX512-BF16'}) computes bf16 natively"
    # bf16 hardware, but torch's kernels run at a lower level (ATEN_CPU_CAPABILITY, a VM that hides AVX-512)
    return None, f"this CPU has {hw[0]} but torch runs its {facts.capability} kernels"


def time_bf16_vs_fp32(n: int = 256, repeats: int = 5) -> float:
    """t_bf16 / t_fp32 of an (n x n) @ (n x n) product: the best of `repeats` calls each, alternated, after
    a warm-up call each. ~2 ms where bf16 is native, up to ~100 ms where it is emulated. On a loaded machine
    the ratio is noisy (2-15 for emulated bf16 at load 16 on 2 cores), but the two kinds of CPU stay far
    apart on either side of PROBE_NATIVE_BELOW."""
    import time

    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = {dt: float("inf") for dt in pairs}
    for dt, (x, y) in pairs.items():
        x @ y  # warm-up: oneDNN builds its kernel on the first call
    for _ in range(repeats):
        for dt, (x, y) in pairs.items():
            t0 = time.perf_counter()
            x @ y
            best[dt] = min(best[dt], time.perf_counter() - t0)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def judge_bf16(facts: CpuFacts, timer: "typing.Callable[[], float]" = time_bf16_vs_fp32) -> Bf16Support:
    """The capability verdict; where it is ambiguous, one timed probe (`timer` returns t_bf16 / t_fp32)."""
    native, why = bf16_verdict(facts)
    if native is not None:
        return Bf16Support(native, why)
    ratio = timer()
    native = ratio <= PROBE_NATIVE_BELOW
    return Bf16Support(native, f"{why}; a bf16 matmul timed {ratio:.2g}x the fp32 one", slowdown=ratio)


@functools.lru_cache(maxsize=None)
def cpu_bf16_support() -> Bf16Support:
    """This machine's answer, once per process (the probe, when it runs, takes milliseconds)."""
    return judge_bf16(cpu_facts())


def cpu_has_amx_bf16() -> bool:
    """AMX tiles that torch's bf16 kernels use: the CPU has them and bf16 is native to torch here (not hidden
    by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA or a VM). For fast paths tuned on an AMX CPU."""
    import torch

    f = cpu_facts()
    if f.flags is not None:
        has = "amx_bf16" in f.flags
    else:
        try:
            has = bool(torch.cpu._is_amx_tile_supported())
        except Exception:  # a private helper a future torch may drop
            has = False
    return has and cpu_bf16_support().native


def cpu_summary() -> str:
    """The CPU for benchmark tables and cards: model name, torch's kernel level, and whether torch computes
    bf16 natively on it, e.g. 'Intel(R) Xeon(R) Processor (AVX512, AMX bf16)' or
    'AMD EPYC 7B13 (AVX2, no native bf16)'."""
    f = cpu_facts()
    flags = f.flags or frozenset()
    if not cpu_bf16_support().native:
        bf16 = "no native bf16"
    else:
        bf16 = "AMX bf16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "native bf16"
    return f"{f.model} ({f.capability}, {bf16})"


_announced: set = set()


def resolve_dtype(name: str, device: "str | torch.device" = "cpu", *,
                  probe: "typing.Callable[[], Bf16Support] | None" = None,
                  announce: bool = True) -> "tuple[torch.dtype, str]":
    """`--dtype` -> (torch dtype, one-line reason). `auto`: on CUDA bf16 where the GPU supports it; on a CPU
    bf16 only where it computes bf16 natively (cpu_bf16_support, or `probe` in its place: tests inject one),
    fp32 everywhere else (MPS included). An explicit bf16 on a CPU without native bf16 is honoured, with a
    warning that says how much slower it will be. `announce` prints what `auto` chose, and the warning, once
    per process to stderr (an explicit fp32 or bf16 needs no words)."""
    import torch

    if name not in DTYPE_CHOICES and name not in DTYPE_NAMES:
        raise GlassmindError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}")
    device = torch.device(device)
    warning = None
    if name == "auto":
        if device.type == "cuda":
            ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if ok else torch.float32
            reason = f"dtype auto -> {'bf16' if ok else 'fp32'}: this GPU {'supports' if ok else 'lacks'} bf16"
        elif device.type == "cpu":
            s = (probe or cpu_bf16_support)()
            dtype = torch.bfloat16 if s.native else torch.float32
            reason = f"dtype auto -> {'bf16' if s.native else 'fp32'}: {s.why}"
        else:
            dtype, reason = torch.float32, f"dtype auto -> fp32: on {device.type} (bf16 autocast not checked there)"
    else:
        dtype = parse_dtype(name)
        short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        reason = f"dtype {short}: as asked"
        if dtype == torch.bfloat16 and device.type == "cpu":
            s = (probe or cpu_bf16_support)()
            if not s.native:
                ratio = s.slowdown if s.slowdown is not None else time_bf16_vs_fp32()
                warning = (f"warning: --dtype bf16 on a CPU without native bf16 ({s.why}): a bf16 matmul takes "
                           f"{ratio:.1f}x as long as an fp32 one here, so expect a much slower run; "
                           "--dtype auto picks fp32 on this machine")
                reason += f" ({ratio:.1f}x slower matmuls than fp32 here)"
    if announce and (name == "auto" or warning) and (reason, warning) not in _announced:
        _announced.add((reason, warning))
        if is_rank0():  # stderr: `glassmind generate ... > out.txt` keeps only the text
            print(reason, file=sys.stderr, flush=True)
            if warning:
                print(warning, file=sys.stderr, flush=True)
    return dtype, reason


def dtype_name(dtype: "torch.dtype") -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


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


def dispatch(table: "dict[str, tuple[str, str]]", argv: "list[str] | None", *, prog: str, kind: str,
             kinds: str) -> int:
    """`prog NAME [args]`: import table[NAME]'s module only now and run its main(args); no NAME or --help lists
    the table. Used by `glassmind VERB` and `glassmind study NAME`."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(len(name) for name in table)
    usage = "\n".join([f"usage: {prog} <{kind}> [options]   ({prog} <{kind}> --help for its options)", "",
                        f"{kinds}:"] + [f"  {name:<{width}}  {summary}" for name, (_, summary) in table.items()])
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: unknown {kind} {name!r}\n\n{usage}", file=sys.stderr)
        return 2
    return int(importlib.import_module(table[name][0]).main(rest) or 0)


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
