"""Independent runs in a process pool on one machine, without contending for cores, each point's result kept
so a killed pool resumes where it stopped. Used by the studies (glassmind.studies.sweep re-exports it) and by
the evals that train several small models (layer 3, so both may import it).

A point is a dict with a unique "name". Its result lives in `<root>/points/<name>.json`, written atomically
when the point finishes, so a pool killed at any instant resumes by running only the points that have no
result file (a half-trained run directory a point left behind is the point's own business: pretrain runs
resume from their last checkpoint).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Callable

from glassmind.common import GlassmindError, atomic_write_json


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
