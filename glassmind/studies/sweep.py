"""What every study shares: points run in a process pool without contending for cores, a finished point
skipped on resume (glassmind.train.pool, re-exported here), the CSV, and the command that made the study.
"""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from glassmind.common import atomic_write_text
# the studies' names for the pool: glassmind.studies.sweep.run_points and the rest
from glassmind.train.pool import cores, load_result, plan_workers, result_path, run_points  # noqa: F401


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
