"""Small models trained from scratch on an eval's generated documents, and how the evals read a model.

train(...) writes the documents to JSONL and runs the pretrain recipe as a subprocess
(`python -m glassmind pretrain ...`), exactly as a person would; a run whose data and flags are unchanged
is reused (a `.eval_stamp` holds their hash), so a repeated eval does not retrain. train_many(...) trains a
suite's independent models side by side, one per core (glassmind.train.pool.plan_workers): these models
are too small for a second thread to help one of them, so two cores train two of them in about the time of one.

score_candidates(...) picks a probe's answer from its closed candidate set by the model's log-probability
of ' ' + candidate after the prompt (the sum over the candidate's tokens): for the short answers of these
generated worlds that is the model's own choice among the answers that make sense, without sampling noise.
greedy(...) decodes free text for answers with no closed set (arithmetic).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from glassmind.common import GlassmindError, atomic_write_text


def train(out: Path, docs: Sequence[str], *, positional: str = "rope", steps: int = 300, context: int = 128,
          d_model: int = 64, n_layers: int = 2, n_heads: int = 2, vocab_size: int = 512, lr: float = 3e-3,
          batch_tokens: int = 4096, seed: int = 0, threads: int | None = None, val_fraction: float = 0.02,
          log=print) -> Path:
    out = Path(out)
    micro = max(1, batch_tokens // context)
    batch_tokens = micro * context  # the recipe wants a whole number of sequences per step
    data = out.parent / f"{out.name}.data.jsonl"
    flags = ["--arch", "decoder", "--positional", positional, "--steps", str(steps), "--context", str(context),
             "--d-model", str(d_model), "--n-layers", str(n_layers), "--n-heads", str(n_heads),
             "--vocab-size", str(vocab_size), "--lr", str(lr), "--batch-tokens", str(batch_tokens),
             "--micro-batch", str(micro), "--seed", str(seed), "--eval-every", "0",
             "--val-fraction", str(val_fraction), "--tokenizer-bytes", "400000", "--ckpt-every", str(steps + 1),
             "--warmup-steps", str(max(1, steps // 20)), "--no-progress"]
    if threads:
        flags += ["--threads", str(threads)]
    stamp = hashlib.sha256(("\n".join(docs) + "\0" + " ".join(flags)).encode()).hexdigest()
    stamp_file = out / ".eval_stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp and (out / "model.safetensors").exists():
        log(f"  reusing {out} (same data and flags)")
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    cmd = [sys.executable, "-m", "glassmind", "pretrain", "--out", str(out), "--data", str(data),
           "--shards-dir", str(out.parent / ".shards"), *flags]
    log(f"  training {out.name}: {' '.join(cmd[1:])}")
    t0 = time.time()
    proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise GlassmindError(f"training {out} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    done = [line for line in proc.stdout.splitlines() if line.startswith("done:")]
    log(f"  {done[-1] if done else 'done'} ({time.time() - t0:.0f} s)")
    atomic_write_text(stamp_file, stamp)
    return out


def train_many(jobs: Sequence[dict], *, threads: int | None = None, log=print) -> list[Path]:
    """Train every job (the keyword arguments of `train`, `out` and `docs` included) and return their run
    directories in order. `threads` is what the whole group may use (None: every core this process may run
    on): min(threads, len(jobs)) trainings run at once with threads // that many torch threads each, so the
    group never oversubscribes the cores. A failed training raises once the others have finished."""
    from concurrent.futures import ThreadPoolExecutor

    from glassmind.train.pool import cores

    total = threads or cores()
    workers = max(1, min(total, len(jobs)))
    each = max(1, total // workers)
    if len(jobs) > 1:
        log(f"  training {len(jobs)} models, {workers} at a time x {each} thread(s)")
    # threads only wait on the pretrain subprocesses; the work runs in those processes
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(train, **{**job, "threads": each}, log=log) for job in jobs]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]


def _child_env() -> dict:
    env = dict(os.environ)
    # the child must import this same glassmind (a worktree on PYTHONPATH), not another installed copy
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def sft(out: Path, parent: Path, data: Path, *, steps: int = 300, batch_size: int = 32, lr: float = 1e-3,
        seed: int = 0, threads: int | None = None, log=print) -> Path:
    """`python -m glassmind sft --from PARENT --data DATA` into `out` (reused when parent weights, data and
    flags are unchanged). The recipe's own held-out check on the built-in tasks is kept minimal (world task,
    2 prompts): the eval measures the fine-tuned model itself."""
    out, parent, data = Path(out), Path(parent), Path(data)
    flags = ["--steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr), "--seed", str(seed),
             "--warmup-steps", str(max(1, steps // 20)), "--eval-every", "0", "--tasks", "world",
             "--eval-per-task", "2", "--ckpt-every", str(steps + 1), "--no-progress"]
    if threads:
        flags += ["--threads", str(threads)]
    h = hashlib.sha256()
    h.update((parent / "model.safetensors").read_bytes())
    h.update(data.read_bytes())
    h.update(" ".join(flags).encode())
    stamp, stamp_file = h.hexdigest(), out / ".eval_stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp and (out / "model.safetensors").exists():
        log(f"  reusing {out} (same parent, data and flags)")
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "glassmind", "sft", "--from", str(parent), "--out", str(out), "--data", str(data),
           *flags]
    log(f"  fine-tuning {out.name}: {' '.join(cmd[1:])}")
    t0 = time.time()
    proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise GlassmindError(f"fine-tuning {out} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    log(f"  sft done ({time.time() - t0:.0f} s)")
    atomic_write_text(stamp_file, stamp)
    return out


def load(run: Path):
    from glassmind import tokenizer as tok_lib
    from glassmind.model import load_model

    return load_model(run), tok_lib.load(run)


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text)


@torch.no_grad()
def candidate_logprobs(model, tok, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                       batch_size: int = 256) -> list[list[float]]:
    """log p(' ' + c | prompt) summed over c's tokens, for every candidate c of every prompt. Rows are
    right-padded (a causal model's earlier positions never see the padding). Prompts longer than the
    model's context keep their end."""
    ctx = model.config.context_length
    # an empty prompt (scoring a whole sentence) starts from the document separator, as documents did in training
    bos = tok.special_tokens.get("<|endoftext|>")
    rows, owners = [], []
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        pid = _encode(tok, p)
        if not pid:
            if bos is None:
                raise ValueError("an empty prompt needs the tokenizer's <|endoftext|> to start from")
            pid = [bos]
        for c in cands:
            cid = _encode(tok, (" " + c) if p else c)
            ids = (pid + cid)[-ctx:]
            rows.append((ids, len(cid)))
            owners.append(i)
    out = [[] for _ in prompts]
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        T = max(len(r[0]) for r in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        for j, (r, _) in enumerate(chunk):
            ids[j, :len(r)] = torch.tensor(r)
        logp = torch.log_softmax(model(ids).float(), dim=-1)
        for j, (r, n) in enumerate(chunk):
            L = len(r)
            tgt = torch.tensor(r[L - n:])
            lp = logp[j, L - n - 1:L - 1].gather(1, tgt[:, None]).sum().item()
            out[owners[s + j]].append(lp)
    return out


@torch.no_grad()
def greedy(model, tok, prompts: Sequence[str], *, max_new_tokens: int, stop: str | None = None) -> list[str]:
    """Greedy continuations (no KV cache: answers here are a few tokens), prompts grouped by token length so
    no padding is needed. Stops at the first occurrence of `stop` in the decoded text."""
    enc = [_encode(tok, p) for p in prompts]
    out = [""] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        groups.setdefault(len(e), []).append(i)
    ctx = model.config.context_length
    for _, idx in groups.items():
        ids = torch.tensor([enc[i] for i in idx])
        new = []
        for _ in range(max_new_tokens):
            nxt = model(ids[:, -ctx:])[:, -1].argmax(-1)
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
        new_ids = torch.stack(new, 1).tolist()
        for i, row in zip(idx, new_ids):
            text = tok.decode(row)
            if stop and stop in text:
                text = text[:text.index(stop)]
            out[i] = text.strip()
    return out
