"""How an eval leaves its results (the studies' conventions): OUT/points.csv (every measured point),
OUT/*.png (plots), OUT/result.json (the headline numbers, machine-readable, read by `glassmind report`) and
OUT/card.md (the numbers and the command that made them). OUT defaults to RUN/evals/<suite>/."""

from __future__ import annotations

import csv
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from glassmind.common import atomic_write_json, atomic_write_text


def write_points(out: Path, rows: Sequence[dict]) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return atomic_write_text(Path(out) / "points.csv", buf.getvalue())


def fmt_ci(value: float, ci: Sequence[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def command_line() -> str:
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("glassmind", "__main__.py")) else None
    return "glassmind " + shlex.join(argv) if argv else "(called from Python)"


def write_result(out: Path, *, suite: str, title: str, what: str, numbers: dict[str, Any], plots: Sequence[str],
                 notes: Sequence[str] = (), runs: Sequence[str] = (), seconds: float | None = None,
                 command: str | None = None) -> dict:
    """result.json and card.md. `numbers` values are plain numbers or 'value [lo, hi]' strings."""
    out = Path(out)
    result = {"suite": suite, "title": title, "what": what, "numbers": numbers, "plots": list(plots),
              "notes": list(notes), "runs": list(runs), "seconds": seconds, "command": command or command_line()}
    atomic_write_json(out / "result.json", result)
    lines = [f"# {title}", "", what, "", f"Command: `{result['command']}`", ""]
    if runs:
        lines += ["Runs: " + ", ".join(f"`{r}`" for r in runs), ""]
    lines += ["| quantity | value (95% interval) |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in numbers.items()]
    for n in notes:
        lines += ["", n]
    for p in plots:
        lines += ["", f"![{p}]({p})"]
    if seconds is not None:
        lines += ["", f"Took {seconds:.0f} s."]
    lines += ["", "Every point is in points.csv."]
    atomic_write_text(out / "card.md", "\n".join(lines) + "\n")
    return result


def figure(*args, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path).name


def errbars(values: Sequence[float], cis: Sequence[Sequence[float]]):
    """matplotlib yerr (2, n) from point values and their intervals."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    lo = np.asarray([c[0] for c in cis], dtype=float)
    hi = np.asarray([c[1] for c in cis], dtype=float)
    return np.stack([np.maximum(v - lo, 0), np.maximum(hi - v, 0)])


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
