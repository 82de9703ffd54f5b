"""`glassmind autopsy RUN "prompt"`: one forward pass explained, as a self-contained HTML report.

    glassmind autopsy runs/demo/pretrain-decoder "def __init__(self" --out runs/autopsy
    glassmind autopsy runs/demo/pretrain-decoder "import os" --target " sys" --compare "import re"
    glassmind autopsy runs/minilm "The capital of France is [MASK]." --layers 0 5 --heads 0 1
    glassmind autopsy runs/induction "w3 w9 w4 w17 w3 w9 w4" --checkpoints

Writes OUT/report.html (figures inline as PNG data URIs; no script, no CDN, every piece of model or user
text escaped), OUT/*.png and OUT/autopsy.json (every number: the schema in docs/contracts.md), and prints
the narration and the path. Bad input (an unknown run, a prompt over the context, a target that is not one
token, a layer or head out of range) stops with a message naming the fix before any work.
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from glassmind.common import GlassmindError, add_config_args, atomic_write_json, atomic_write_text, config_from_args, run_main
from glassmind.autopsy.api import autopsy_json, check_json, decoder_start_id, piece_of, validate


@dataclass
class AutopsyConfig:
    target: Optional[str] = field(default=None, metadata={"help": "the token to explain (default: the model's top "
                                                                  "guess); one token, or #ID"})
    compare: Optional[str] = field(default=None, metadata={"help": "a corrupted prompt of the same token length: "
                                                                   "activation patching"})
    position: int = field(default=-1, metadata={"help": "position explained (decoder: the token after it; encoder: "
                                                        "default the first mask)"})
    decoder_prefix: str = field(default="", metadata={"help": "encoder-decoder: text the decoder has written so "
                                                              "far (after its start token)"})
    layers: list[int] = field(default_factory=list, metadata={"help": "only these layers' attention maps and "
                                                                       "ablations (default all)"})
    heads: list[int] = field(default_factory=list, metadata={"help": "only these heads (default all)"})
    tuned_lens: bool = field(default=False, metadata={"help": "add the tuned lens (trained once, saved in RUN)"})
    checkpoints: bool = field(default=False, metadata={"help": "follow the prediction and the head detectors "
                                                               "across RUN's saved checkpoints"})
    top_k: int = field(default=5, metadata={"help": "tokens listed per lens cell"})
    ablation: str = field(default="mean", metadata={"help": "zero | mean", "choices": ("zero", "mean")})
    out: Optional[str] = field(default=None, metadata={"help": "output folder (default RUN/autopsy)"})


# ------------------------------------------------------------------------------------------- inputs


def load_run(run: str | Path):
    from glassmind import tokenizer as tok_lib
    from glassmind.model import load_model

    run = Path(run)
    if not (run / "config.json").exists() or not (run / "model.safetensors").exists():
        raise GlassmindError(f"{run} is not a run directory (no config.json and model.safetensors): pass a run "
                             "written by a glassmind verb or `glassmind convert --from-hf`")
    if not any((run / f).exists() for f in ("tokenizer.json", "vocab.txt")):
        raise GlassmindError(f"{run} has no tokenizer.json: copy the tokenizer the model was trained with into it")
    return load_model(run).eval(), tok_lib.load(run)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, allowed_special="all")


def target_id(tokenizer, target: str | None) -> int | None:
    if target is None:
        return None
    if target.startswith("#") and target[1:].isdigit():
        return int(target[1:])
    ids = encode(tokenizer, target)
    if len(ids) != 1:
        pieces = [piece_of(tokenizer, i) for i in ids]
        raise GlassmindError(f"target {target!r} is {len(ids)} tokens {pieces}, not one: pass a single token "
                             "(mind a leading space, e.g. ' Paris'), or its id as #ID")
    return ids[0]


# ------------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(s: str, n: int = 10) -> str:
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s).replace("$", r"\$")  # \n, \x0c: no glyph
    return s if len(s) <= n else s[: n - 1] + "…"


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return path


def fig_attention(maps: list[list[list[list[float]]]], rows_tok: list[str], cols_tok: list[str], layers: list[int],
                  heads: list[int], title: str, path: Path) -> Path:
    plt = _plt()
    nl, nh = len(maps), len(maps[0])
    size = max(2.2, min(4.5, 0.16 * len(cols_tok) + 1.2))
    fig, axes = plt.subplots(nl, nh, figsize=(size * nh, size * nl), squeeze=False)
    show = len(cols_tok) <= 40
    for i in range(nl):
        for j in range(nh):
            ax = axes[i][j]
            ax.imshow(torch.tensor(maps[i][j]).numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"L{layers[i]}.{'X' if 'cross' in title else 'H'}{heads[j]}", fontsize=9)
            if show:
                ax.set_xticks(range(len(cols_tok)), [_label(t) for t in cols_tok], rotation=90, fontsize=6)
                ax.set_yticks(range(len(rows_tok)), [_label(t) for t in rows_tok], fontsize=6)
            else:
                ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{title} (row: query, column: key)", fontsize=10)
    return _save(fig, path)


def fig_lens(grid: list[list[dict]], rows: list[str], tokens: list[str], title: str, path: Path,
             masked: bool = False) -> Path:
    plt = _plt()
    T = len(tokens)
    prob = torch.tensor([[c["top"][0][1] for c in row] for row in grid])              # (rows, T)
    fig, ax = plt.subplots(figsize=(max(4, min(24, 0.9 * T + 1.5)), 0.55 * len(rows) + 1.5))
    im = ax.imshow(prob.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    if T <= 40:
        for l in range(len(rows)):
            for t in range(T):
                ax.text(t, l, _label(grid[l][t]["top"][0][0], 6), ha="center", va="center", fontsize=6,
                        color="white" if prob[l, t] < 0.6 else "black")
        ax.set_xticks(range(T), [_label(t) for t in tokens], rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    what = "the token at that position" if masked else "the next token"
    ax.set_xlabel(f"input position (each cell: the top guess for {what}, colour: its probability)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def fig_bars(items: list[tuple[str, float]], title: str, xlabel: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(items) + 1.2))
    names = [n for n, _ in items]
    vals = [v for _, v in items]
    ax.barh(range(len(items)), vals, color=["tab:blue" if v >= 0 else "tab:red" for v in vals])
    ax.set_yticks(range(len(items)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def fig_pca(r: dict, path: Path) -> Path:
    plt = _plt()
    xy = r["embedding_pca"]["coords"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=12)
    for (x, y), t in zip(xy, r["tokens"]):
        ax.annotate(_label(t, 12), (x, y), fontsize=7)
    v = r["embedding_pca"]["explained_variance"]
    ax.set_xlabel(f"PC1 ({v[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({v[1]:.0%})" if len(v) > 1 else "PC2")
    ax.set_title("the prompt's token embeddings, PCA", fontsize=10)
    return _save(fig, path)


def fig_positional(r: dict, path: Path) -> Path | None:
    pe = r["positional"]
    if not pe["values"]:
        return None
    plt = _plt()
    v = torch.tensor(pe["values"])                                                    # (T, C or D)
    fig, ax = plt.subplots(figsize=(7, 2.8))
    im = ax.imshow(v.numpy(), aspect="auto", cmap="RdBu_r")
    ax.set_xlabel("dimension")
    ax.set_ylabel("position")
    ax.set_title({"learned": "learned position embeddings", "sinusoidal": "sinusoidal position encodings",
                  "rope": "rotary angles: cos(position x frequency)"}[pe["kind"]], fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, path)


def fig_checkpoints(rows: list[dict], target_piece: str, path: Path) -> Path:
    plt = _plt()
    steps = [c["step"] for c in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(steps, [c["target_prob"] for c in rows], "o-", color="tab:red", label=f"p({target_piece!r})")
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("probability")
    ax2 = ax.twinx()
    ax2.plot(steps, [c["max_induction_score"] for c in rows], "s-", color="tab:blue", label="max induction score")
    ax2.plot(steps, [c["max_previous_token_score"] for c in rows], "^-", color="tab:green",
             label="max previous-token score")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper left", fontsize=7)
    ax.set_title("across the run's checkpoints", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    """Saved model snapshots of a run: checkpoints/step_* (the induction study) or train_state/step_* (the
    training verbs), each with a model.safetensors, sorted by step."""
    out = []
    for sub in ("checkpoints", "train_state"):
        for p in (run / sub).glob("step_*"):
            if (p / "model.safetensors").exists() and p.name.split("_")[-1].isdigit():
                out.append((int(p.name.split("_")[-1]), p))
    return sorted(out)


@torch.no_grad()
def across_checkpoints(run: Path, model, ids: list[int], tgt_ids, pos: int, target: int) -> list[dict]:
    from safetensors.torch import load_file

    from glassmind.autopsy.causal import head_scores
    from glassmind.autopsy.hooks import forward

    dirs = checkpoint_dirs(run)
    if not dirs:
        raise GlassmindError(f"{run} keeps no checkpoints (checkpoints/step_* or train_state/step_*): drop "
                             "--checkpoints, or train with checkpoints kept")
    import copy

    m = copy.deepcopy(model)
    rows = []
    for step, path in dirs:
        m.load_state_dict(load_file(str(path / "model.safetensors")))
        m.eval()
        logits = forward(m, torch.tensor([ids]), torch.tensor([tgt_ids]) if tgt_ids is not None else None)
        p = float(logits[0, pos].float().softmax(-1)[target])
        s = head_scores(m, half=min(32, m.config.context_length // 2), n_seqs=8)
        rows.append({"step": step, "target_prob": p,
                     "max_induction_score": max(max(x) for x in s["induction"]),
                     "max_previous_token_score": max(max(x) for x in s["previous_token"])})
    return rows


# ------------------------------------------------------------------------------------------------ html


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;border-bottom:1px solid #ddd;margin-top:2em}img{max-width:100%}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}.tok{font-family:monospace;background:#eef;padding:0 2px;
white-space:pre}.n{color:#666;font-size:.85em}li{margin:.4em 0}"""


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v


def render_html(r: dict, figs: dict[str, Path | None], run: str, prompt: str) -> str:
    t = r["target"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>autopsy: {_e(prompt[:60])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Autopsy of one forward pass</h1><p>run <code>{_e(run)}</code> ({_e(r['arch'])}); prompt "
             f"<span class='tok'>{_e(prompt)}</span>; explained position {r['position']}; target "
             f"<span class='tok'>{_e(t['piece'])}</span> (id {t['id']}, p = {t['prob']:.4f}, rank {t['rank']})</p>",
             "<p>Tokens: " + " ".join(f"<span class='tok'>{_e(x)}</span>" for x in r["tokens"]) + "</p>",
             "<h2>The account</h2><ol>"]
    for s in r["narration"]:
        nums = ", ".join(f"{_e(k)}={_e(_round(v))}" for k, v in s["numbers"].items())
        parts.append(f"<li>{_e(s['text'])} <span class='n'>[{_e(s['kind'])}: {nums}]</span></li>")
    parts.append("</ol><h2>Top guesses</h2><table><tr><th>token</th><th>probability</th></tr>")
    parts += [f"<tr><td class='tok'>{_e(p)}</td><td>{v:.4f}</td></tr>" for p, v in r["prediction"]]
    parts.append("</table>")
    sections = [("lens", "Logit lens"), ("tuned_lens", "Tuned lens"), ("attention", "Self-attention"),
                ("encoder_attention", "Encoder self-attention"), ("cross_attention", "Cross-attention"),
                ("attribution", "Direct logit attribution"), ("ablation", "Ablation"), ("patching", "Patching"),
                ("checkpoints", "Across checkpoints"), ("pca", "Embeddings"), ("positional", "Positional encodings")]
    for key, title in sections:
        if figs.get(key) is None and key not in ("ablation", "patching", "pca"):
            continue
        if key in ("ablation", "patching") and not r.get(key):
            continue
        if key == "ablation" and r.get("ablation"):
            parts.append(f"<h2>{title}</h2><table><tr><th>component</th><th>mode</th><th>log p before</th>"
                         "<th>log p after</th><th>change</th></tr>")
            for a in r["ablation"]:
                parts.append(f"<tr><td>{_e(a['component'])}</td><td>{_e(a['mode'])}</td><td>{a['logprob_before']:.3f}"
                             f"</td><td>{a['logprob_after']:.3f}</td><td>{a['logprob_after'] - a['logprob_before']:+.3f}"
                             "</td></tr>")
            parts.append("</table>")
            continue
        if key == "patching" and r.get("patching"):
            parts.append(f"<h2>{title}</h2><p>corrupted prompt: " + " ".join(
                f"<span class='tok'>{_e(x)}</span>" for x in r["compare_tokens"]) + "</p><table><tr><th>component"
                "</th><th>log p clean</th><th>corrupted</th><th>patched</th><th>restored</th></tr>")
            for a in r["patching"]:
                parts.append(f"<tr><td>{_e(a['component'])}</td><td>{a['logprob_clean']:.3f}</td><td>"
                             f"{a['logprob_corrupted']:.3f}</td><td>{a['logprob_patched']:.3f}</td><td>"
                             f"{a['restored']:.2f}</td></tr>")
            parts.append("</table>")
            continue
        if key == "pca":
            parts.append(f"<h2>{title}</h2>{_img(figs.get('pca'), 'PCA of token embeddings')}<table><tr><th>token"
                         "</th><th>nearest tokens by cosine</th></tr>")
            for nb in r["embedding_neighbours"]:
                cells = ", ".join(f"<span class='tok'>{_e(p)}</span> {c:.2f}" for p, c in nb["neighbours"])
                parts.append(f"<tr><td class='tok'>{_e(nb['token'])}</td><td style='text-align:left'>{cells}</td></tr>")
            parts.append("</table>")
            continue
        parts.append(f"<h2>{title}</h2>{_img(figs[key], title)}")
    parts.append("<p class='n'>Every number is in autopsy.json beside this file. Causal verbs appear only in "
                 "sentences backed by an ablation or a patch.</p></body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ verb


def autopsy_run(run: str | Path, prompt: str, cfg: AutopsyConfig) -> dict[str, Any]:
    """Check every input, measure, write OUT/report.html + PNGs + autopsy.json; return the dict and paths."""
    run = Path(run)
    model, tok = load_run(run)
    ids = encode(tok, prompt)
    tgt_ids = None
    if model.config.arch == "encoder-decoder":
        tgt_ids = [decoder_start_id(model, tok)] + (encode(tok, cfg.decoder_prefix) if cfg.decoder_prefix else [])
    validate(model, ids, tgt_ids, cfg.layers, cfg.heads)
    target = target_id(tok, cfg.target)
    compare = encode(tok, cfg.compare) if cfg.compare is not None else None
    if compare is not None and len(compare) != len(ids):
        raise GlassmindError(f"--compare is {len(compare)} tokens and the prompt {len(ids)}: patching pairs "
                             "positions, so give a corrupted prompt of the same token length")
    if cfg.checkpoints and not checkpoint_dirs(run):
        raise GlassmindError(f"{run} keeps no checkpoints (checkpoints/step_* or train_state/step_*): drop "
                             "--checkpoints")
    out = Path(cfg.out) if cfg.out else run / "autopsy"
    out.mkdir(parents=True, exist_ok=True)
    lens = None
    if cfg.tuned_lens:
        from glassmind.autopsy.lens import tuned_lens_for_run

        lens, _ = tuned_lens_for_run(run, model, tok)
    r = autopsy_json(model, tok, ids, position=cfg.position, target=target, top_k=cfg.top_k, tgt_ids=tgt_ids,
                     compare_ids=compare, layers=cfg.layers or None, heads=cfg.heads or None, tuned_lens=lens,
                     ablation_mode=cfg.ablation)
    if cfg.checkpoints:
        r["checkpoints"] = across_checkpoints(run, model, ids, tgt_ids, r["position"], r["target"]["id"])
    check_json(r)
    explained = r.get("decoder_tokens", r["tokens"])
    figs: dict[str, Path | None] = {}
    figs["lens"] = fig_lens(r["lens"], r["lens_rows"], explained, "logit lens", out / "lens.png",
                           masked=r["arch"] == "encoder")
    if "tuned_lens" in r:
        figs["tuned_lens"] = fig_lens(r["tuned_lens"], r["lens_rows"], explained, "tuned lens",
                                      out / "tuned_lens.png", masked=r["arch"] == "encoder")
    figs["attention"] = fig_attention(r["attention"], explained, explained, r["layers"], r["heads"],
                                      "self-attention" if r["arch"] != "encoder-decoder" else "decoder self-attention",
                                      out / "attention.png")
    if r["arch"] == "encoder-decoder":
        if r["encoder_attention"]:
            figs["encoder_attention"] = fig_attention(r["encoder_attention"], r["tokens"], r["tokens"],
                                                      [l for l in r["layers"]
                                                       if l < model.config.n_encoder_layers_total], r["heads"],
                                                      "encoder self-attention", out / "encoder_attention.png")
        figs["cross_attention"] = fig_attention(r["cross_attention"], explained, r["tokens"], r["layers"], r["heads"],
                                                "cross-attention", out / "cross_attention.png")
    items = sorted(((a["component"], a["value"]) for a in r["attribution"]), key=lambda x: -abs(x[1]))[:30]
    figs["attribution"] = fig_bars(items, f"direct contribution to the logit of {r['target']['piece']!r}",
                                   "logit contribution", out / "attribution.png")
    figs["pca"] = fig_pca(r, out / "embeddings_pca.png")
    figs["positional"] = fig_positional(r, out / "positional.png")
    if cfg.checkpoints:
        figs["checkpoints"] = fig_checkpoints(r["checkpoints"], r["target"]["piece"], out / "checkpoints.png")
    atomic_write_json(out / "autopsy.json", r)
    atomic_write_text(out / "report.html", render_html(r, figs, str(run), prompt))
    return {"result": r, "report": out / "report.html", "json": out / "autopsy.json", "figures": figs}


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="glassmind autopsy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("prompt", help="the text whose forward pass is explained")
    add_config_args(p, AutopsyConfig)
    ns = p.parse_args(argv)
    cfg = config_from_args(AutopsyConfig, ns)
    done = autopsy_run(ns.run, ns.prompt, cfg)
    for s in done["result"]["narration"]:
        print(s["text"])
    print(f"report: {done['report']}\nnumbers: {done['json']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
