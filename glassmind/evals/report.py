"""`glassmind report RUN`: the run's report card, one self-contained HTML page at RUN/report/index.html.

It gathers what is already in the run directory; it runs nothing:

    lineage     the chain of parent runs, read from each run's card.md ('Parent: ...') or its settings JSON
                (init_from / policy / parent / from fields), with each card's headline table
    training    every PNG at the run's top level (loss curves) and a loss curve drawn from metrics.jsonl
    evals       RUN/evals/<suite>/result.json (numbers with intervals, plots, the command that made them)
    autopsies   RUN/autopsy*/ (report.html linked, PNGs inline)
    studies     RUN/studies/<name>/ PNGs and card.md, where a study wrote under the run

Images are inlined as data: URIs, every piece of text from files is HTML-escaped, there is no script and no
external link except relative links to reports beside it. RUN/report/summary.png exports the page's main
figure (the loss curve beside the evals' headline numbers).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import time
from pathlib import Path

from glassmind.common import GlassmindError, atomic_write_text, run_main

PARENT_FIELDS = ("init_from", "policy", "parent", "from_run", "sft", "base")
MAX_LINEAGE = 12


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def img(path: Path, alt: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt or Path(path).name)}" src="data:image/png;base64,{data}">'


def parent_of(run: Path) -> str | None:
    card = run / "card.md"
    if card.exists():
        m = re.search(r"^Parent: (.+)$", card.read_text(encoding="utf-8", errors="replace"), re.M)
        if m and not m.group(1).startswith("none"):
            return m.group(1).strip()
    for settings in sorted(run.glob("*.json")):
        if settings.name in ("config.json", "tokenizer.json", "hf_config.json"):
            continue
        try:
            obj = json.loads(settings.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict):
            for f in PARENT_FIELDS:
                if isinstance(obj.get(f), str) and obj[f]:
                    return obj[f]
    return None


def lineage(run: Path) -> list[tuple[str, Path | None]]:
    """[(name, path or None if not found)], the run first, then its parent, grandparent ..."""
    chain: list[tuple[str, Path | None]] = [(str(run), run)]
    seen = {run.resolve()}
    cur: Path | None = run
    while cur is not None and len(chain) < MAX_LINEAGE:
        p = parent_of(cur)
        if not p:
            break
        path = Path(p)
        if not path.is_absolute() and not path.exists():
            path = cur.parent / p  # a relative parent written from another working directory
        if not (path / "config.json").exists() and not (path / "card.md").exists():
            chain.append((p, None))
            break
        if path.resolve() in seen:
            break
        seen.add(path.resolve())
        chain.append((p, path))
        cur = path
    return chain


def card_numbers(run: Path) -> list[tuple[str, str]]:
    card = run / "card.md"
    if not card.exists():
        return []
    rows = []
    for line in card.read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.match(r"^\| (.+?) \| (.+?) \|$", line)
        if m and m.group(1) not in ("quantity", "---"):
            rows.append((m.group(1), m.group(2)))
    return rows


def table(rows, head=("quantity", "value")) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out + ["</table>"])


def read_metrics(run: Path) -> list[dict]:
    rows = []
    path = run / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def eval_results(run: Path) -> list[tuple[Path, dict]]:
    out = []
    for res in sorted(run.glob("evals/*/result.json")) + sorted(run.glob("evals/*/*/result.json")):
        try:
            out.append((res.parent, json.loads(res.read_text(encoding="utf-8"))))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return out


def _headline(value) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    m = re.match(r"^\s*(-?[\d.]+) \[", str(value))
    return float(m.group(1)) if m else None


def figure_rows(bars: list[tuple], cap: int = 48) -> list[tuple]:
    """At most `cap` of the (label 'suite: name', value, lo, hi) rows for the figure (the page lists every
    number), shared fairly: each suite keeps its first rows up to an equal share, and the share left unused by
    small suites goes to the larger ones; the rows keep their order."""
    if len(bars) <= cap:
        return bars
    suites: dict[str, list[int]] = {}
    for i, b in enumerate(bars):
        suites.setdefault(b[0].split(":", 1)[0], []).append(i)
    quota = {k: 0 for k in suites}
    left = cap
    while left > 0:
        open_ = [k for k in suites if quota[k] < len(suites[k])]
        if not open_:
            break
        share = max(1, left // len(open_))
        for k in open_:
            take = min(share, len(suites[k]) - quota[k], left)
            quota[k] += take
            left -= take
            if left == 0:
                break
    keep = {i for k, idx in suites.items() for i in idx[:quota[k]]}
    return [b for i, b in enumerate(bars) if i in keep]


def summary_figure(run: Path, metrics: list[dict], evals: list[tuple[Path, dict]], path: Path) -> Path | None:
    """The page's main figure: the training loss (left) and every eval number that has an interval (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [(r["step"], r["loss"]) for r in metrics if "step" in r and isinstance(r.get("loss"), (int, float))]
    bars = []
    for _, res in evals:
        for k, v in res.get("numbers", {}).items():
            m = re.match(r"^\s*(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]", str(v))
            if m:
                bars.append((f"{res['suite']}: {k}", *map(float, m.groups())))
    if not loss and not bars:
        return None
    total = len(bars)
    bars = figure_rows(bars)
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.5, 0.28 * len(bars) + 1)),
                             gridspec_kw={"width_ratios": [1, 1.6]})
    if loss:
        axes[0].plot(*zip(*loss), lw=1)
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("training loss")
    axes[0].set_title(run.name or str(run))
    if bars:
        ys = range(len(bars))
        axes[1].errorbar([b[1] for b in bars], ys, xerr=[[b[1] - b[2] for b in bars], [b[3] - b[1] for b in bars]],
                         fmt="o", capsize=3)
        axes[1].set_yticks(list(ys), [b[0][:70] for b in bars], fontsize=7)
        axes[1].invert_yaxis()
        shown = "" if len(bars) == total else f"; {len(bars)} of {total}, all on the page"
        axes[1].set_title(f"eval numbers (95% intervals{shown})")
    else:
        axes[1].axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;font-size:90%;text-align:left}code{background:#f4f4f4}
.lineage li{margin:.2em 0}.muted{color:#777}h2{border-bottom:1px solid #ddd}"""


def build(run: Path) -> dict:
    if not run.is_dir():
        raise GlassmindError(f"{run} is not a directory: give a run directory written by glassmind")
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics(run)
    evals = eval_results(run)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>report card: {esc(run.name)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>Report card: <code>{esc(run)}</code></h1>",
             f"<p class='muted'>written {esc(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))} by "
             f"<code>glassmind report {esc(run)}</code></p>"]
    summary = summary_figure(run, metrics, evals, out / "summary.png")
    if summary:
        parts += ["<h2>Summary</h2>", img(summary, "summary: loss and eval numbers"),
                  "<p class='muted'>also exported as report/summary.png</p>"]
    # lineage
    chain = lineage(run)
    parts += ["<h2>Lineage</h2>", "<ol class='lineage'>"]
    for name, path in chain:
        if path is None:
            parts.append(f"<li><code>{esc(name)}</code> <span class='muted'>(not found on this machine)</span></li>")
            continue
        first = (path / "card.md").read_text(encoding="utf-8", errors="replace").splitlines()[0] \
            if (path / "card.md").exists() else "(no card.md)"
        parts.append(f"<li><code>{esc(name)}</code>: {esc(first.lstrip('# '))}")
        nums = card_numbers(path)
        if nums:
            parts.append("<details><summary>numbers</summary>" + table(nums) + "</details>")
        parts.append("</li>")
    parts.append("</ol>")
    if len(chain) == 1:
        parts.append("<p class='muted'>trained from scratch, or no parent recorded</p>")
    # training
    pngs = sorted(run.glob("*.png"))
    parts.append("<h2>Training</h2>")
    nums = card_numbers(run)
    if nums:
        parts.append(table(nums))
    parts += [img(p) for p in pngs]
    if not pngs and not nums:
        parts.append("<p class='muted'>no card.md or plots in the run directory</p>")
    # evals
    parts.append("<h2>Evals</h2>")
    if not evals:
        parts.append(f"<p class='muted'>none yet: <code>glassmind eval {esc(run)} --suite NAME</code></p>")
    for d, res in evals:
        parts += [f"<h3>{esc(res.get('title', d.name))}</h3>", f"<p>{esc(res.get('what', ''))}</p>",
                  f"<p>Command: <code>{esc(res.get('command', ''))}</code>"
                  + (f" ({res['seconds']:.0f} s)" if isinstance(res.get("seconds"), (int, float)) else "") + "</p>",
                  table(list(res.get("numbers", {}).items()), ("quantity", "value (95% interval)"))]
        parts += [f"<p>{esc(n)}</p>" for n in res.get("notes", [])]
        parts += [img(d / p) for p in res.get("plots", []) if (d / p).exists()]
    # autopsies and studies
    parts.append("<h2>Autopsies</h2>")
    autopsies = [d for d in sorted(run.glob("autopsy*")) if d.is_dir()]
    if not autopsies:
        parts.append(f"<p class='muted'>none yet: <code>glassmind autopsy {esc(run)} \"prompt\"</code></p>")
    for d in autopsies:
        rel = f"../{d.name}/report.html"
        link = f" (<a href='{esc(rel)}'>full report</a>)" if (d / "report.html").exists() else ""
        parts.append(f"<h3><code>{esc(d.name)}</code>{link}</h3>")
        parts += [img(p) for p in sorted(d.glob("*.png"))[:8]]
    studies = [d for d in sorted(run.glob("studies/*")) if d.is_dir()]
    if studies:
        parts.append("<h2>Studies</h2>")
        for d in studies:
            parts.append(f"<h3><code>{esc(d.name)}</code></h3>")
            parts += [img(p) for p in sorted(d.glob("*.png"))[:8]]
    parts.append("</body></html>")
    page = atomic_write_text(out / "index.html", "\n".join(parts) + "\n")
    return {"report": page, "summary": summary, "lineage": [n for n, _ in chain], "evals": [r["suite"] for _, r in evals]}


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="glassmind report", description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="the run directory")
    ns = p.parse_args(argv)
    res = build(Path(ns.run))
    print(f"wrote {res['report']} (lineage {len(res['lineage'])} runs, evals: {', '.join(res['evals']) or 'none'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)
