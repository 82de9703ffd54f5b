"""What every study shares: points run in a process pool without contending for cores, a finished point
skipped on resume, results written atomically, the CSV, and the command that made the study.

A point is a dict with a unique "name". Its result lives in `<study>/points/<name>.json`, written atomically
when the point finishes, so a study killed at any instant resumes by running only the points that have no
result file (a half-trained run directory a point left behind is the point's own business: pretrain runs
resume from their last checkpoint).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from glassmind.common import GlassmindError, atomic_write_json, atomic_write_text


def cores() -> int:
    """CPU cores this process may run on (the affinity mask where there is one: containers, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def plan_workers(workers: int, n_points: int) -> tuple[int, int]:
    """(processes, torch threads each): `workers` 0 means one per core; threads = cores // workers, so two
    trainings never share a core unless the user asks for more workers than cores."""
    c = cores()
    w = workers or c
    w = max(1, min(w, max(1, n_points)))
    return w, max(1, c // w)


def result_path(root: Path, point: dict) -> Path:
    return root / "points" / f"{point['name']}.json"


def load_result(root: Path, point: dict) -> dict | None:
    p = result_path(root, point)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError:  # cannot happen with atomic writes, but a hand-edited file must not stop the study
        return None


def _run_one(fn: Callable[[dict, int], dict], point: dict, threads: int, root: str) -> dict:
    """In the worker process: limit torch's threads, run the point, write its result atomically."""
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    t0 = time.perf_counter()
    result = fn(point, threads)
    result = {**point, **result, "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(result_path(Path(root), point), result)
    return result


def run_points(root: Path, points: list[dict], fn: Callable[[dict, int], dict], *, workers: int = 0,
               label: str = "points") -> list[dict]:
    """Run every point without a result file; return all results in the order of `points`.

    `fn(point, threads)` must be a module-level function (the pool pickles it). Points run in separate
    processes (spawn: a clean interpreter, no forked torch thread pools) with `threads` torch threads each."""
    names = [p["name"] for p in points]
    if len(set(names)) != len(names):
        raise GlassmindError("two points share a name: each point needs a unique name")
    done = {p["name"]: r for p in points if (r := load_result(root, p)) is not None}
    todo = [p for p in points if p["name"] not in done]
    if done:
        print(f"{label}: {len(done)} finished (skipped), {len(todo)} to run", flush=True)
    if todo:
        n, threads = plan_workers(workers, len(todo))
        print(f"{label}: running {len(todo)} in {n} process(es) x {threads} thread(s)", flush=True)
        t0 = time.perf_counter()
        if n == 1:
            for i, p in enumerate(todo):
                done[p["name"]] = _run_one(fn, p, threads, str(root))
                _progress(label, i + 1, len(todo), t0)
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
                futures = {pool.submit(_run_one, fn, p, threads, str(root)): p for p in todo}
                for i, fut in enumerate(cf.as_completed(futures)):
                    r = fut.result()  # a failed point raises here; finished ones are already on disk
                    done[r["name"]] = r
                    _progress(label, i + 1, len(todo), t0)
    return [done[n] for n in names]


def _progress(label: str, i: int, n: int, t0: float) -> None:
    el = time.perf_counter() - t0
    eta = el / i * (n - i)
    print(f"{label}: {i}/{n} done, {el:.0f}s elapsed, ETA {eta:.0f}s", flush=True)


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    cols = columns or list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in cols})
    return atomic_write_text(path, buf.getvalue())


def command_line(study: str, argv: list[str]) -> str:
    return "glassmind study " + " ".join(shlex.quote(a) for a in [study, *argv])


def glassmind_cmd(*args: str) -> list[str]:
    """`python -m glassmind ARGS` in this interpreter: a recipe run as its own process (recipes are the only way
    to train; the command line is their stable interface)."""
    return [sys.executable, "-m", "glassmind", *args]


def run_glassmind(args: list[str], log: Path) -> None:
    """Run a glassmind verb as a subprocess, its output to `log`; a failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ glassmind " + " ".join(shlex.quote(a) for a in args) + "\n")
        f.flush()
        code = subprocess.call(glassmind_cmd(*args), stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RuntimeError(f"`glassmind {args[0]}` failed (exit {code}); the end of {log}:\n" + "\n".join(tail))


def fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)
