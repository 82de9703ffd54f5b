"""`glassmind demo`: every lifecycle stage that exists, in order, on built-in data, into runs/demo/.

    1. tokenizers   byte-level BPE and WordPiece trained on the built-in corpus
    2. pre-training a small decoder (causal LM), encoder (masked LM), encoder-decoder (span corruption)
    3. inference    generations from the decoder under each decoding strategy, with latency metrics
    4. alignment    SFT, reward model, PPO and DPO on the built-in tasks
    5. autopsy      the demo decoder's forward pass explained; an induction head found, ablated, watched forming
    6. limits       the evals' quick budgets on the final run, and its report card (RUN/report/index.html)

The demo owns its stages and their budgets: each calls recipes (glassmind/recipes), the inference engine or a
study (the alignment study's stage), never the reverse, and the demo keeps a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Any

from glassmind.common import (DTYPE_CHOICES, GlassmindError, atomic_write_text, cpu_summary, dtype_name, pick_device,
                              resolve_dtype, run_main)

SAMPLES = [
    "def fibonacci(n):",
    "The Transformer is a model architecture",
    "naïve café — 東京 🙂",
]


def banner(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


def stage_tokenizers(out: Path, max_bytes: int, vocab_size: int) -> dict:
    """Train both tokenizers on the built-in corpus; print their statistics and a few encodings."""
    from glassmind.data.corpus import texts
    from glassmind.tokenizer.bpe import BPETokenizer
    from glassmind.tokenizer.wordpiece import WordPieceTokenizer

    summary: dict = {}
    val = list(texts(None, split="val", max_bytes=1_000_000))
    val_bytes = sum(len(t.encode("utf-8")) for t in val)
    for kind, train in (("bpe", lambda it: BPETokenizer.train(it, vocab_size, pattern="gpt4")),
                        ("wordpiece", lambda it: WordPieceTokenizer.train(it, vocab_size))):
        print(f"\n--- {kind}: training to vocab {vocab_size} on {max_bytes / 1e6:.0f} MB of the built-in "
              "corpus (train split)", flush=True)
        t0 = time.perf_counter()
        tok = train(texts(None, split="train", max_bytes=max_bytes))
        seconds = time.perf_counter() - t0
        tok.save(out / f"tokenizer-{kind}")
        n_tokens = sum(len(ids) for ids in tok.encode_batch(val))
        stats = {"vocab_size": tok.vocab_size, "train_seconds": round(seconds, 1),
                 "val_bytes": val_bytes, "val_tokens": n_tokens,
                 "bytes_per_token": round(val_bytes / max(n_tokens, 1), 3), "dir": str(out / f"tokenizer-{kind}")}
        summary[kind] = stats
        print(f"{kind}: vocab {tok.vocab_size}, trained in {seconds:.1f} s, validation split "
              f"{val_bytes:,} bytes -> {n_tokens:,} tokens ({stats['bytes_per_token']} bytes/token)")
        for s in SAMPLES:
            ids = tok.encode(s)
            pieces = [tok.id_to_token(i) for i in ids]
            print(f"  {s!r}\n    ids    {ids}\n    pieces {pieces}\n    decode {tok.decode(ids)!r}")
    return summary


def greedy_sample(model, tok, prompt: str = "", *, max_new_tokens: int = 60) -> str:
    """Greedy continuation of `prompt` from a decoder: the plain loop (no KV cache), cropped to the context.
    An empty prompt starts a new document after `<|endoftext|>`."""
    import torch

    from glassmind.data.shards import separator_id

    model.eval()
    sep = separator_id(tok)
    ids = [sep] + tok.encode(prompt)
    device = next(model.parameters()).device
    context = model.config.context_length
    new: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([(ids + new)[-context:]], device=device)
        with torch.no_grad():
            nxt = int(model(x)[0, -1].argmax())
        if nxt == sep:
            break
        new.append(nxt)
    return prompt + tok.decode(new)


DEMO_BUDGETS = {
    # name: (decoder settings, encoder and encoder-decoder settings). "small" is the demo's: ~2.5M tokens for
    # the decoder (2-3 minutes at the ~18k tokens/s an idle 2-core AMX CPU gives this size under bf16 autocast;
    # far slower on a loaded machine), ~300k for each of the others. dtype "auto": bf16 only where the machine
    # computes it natively (common.resolve_dtype), fp32 elsewhere. Small batches and a high lr: more
    # updates from few tokens.
    "small": (dict(depth=2, context=128, micro_batch=16, batch_tokens=2048, steps=1200, eval_every=200, lr=4e-3,
                   val_fraction=0.02, dtype="auto"),
              dict(depth=2, context=64, micro_batch=16, batch_tokens=1024, steps=300, eval_every=100, lr=4e-3,
                   val_fraction=0.05, dtype="auto")),
    "tiny": (dict(depth=1, context=32, micro_batch=4, batch_tokens=256, steps=6, eval_every=3,
                  max_bytes=300_000, val_fraction=0.25, eval_batches=2, threads=1, progress=False),
             dict(depth=1, context=32, micro_batch=4, batch_tokens=256, steps=4, eval_every=2,
                  max_bytes=300_000, val_fraction=0.25, eval_batches=2, threads=1, progress=False)),
}


def pretrain_stage(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, budget: str = "small",
                   dtype: str = "auto", families: tuple[str, ...] = ("decoder", "encoder", "encoder-decoder")
                   ) -> dict:
    """The demo's pre-training stage: a small decoder (causal LM), a tiny encoder (masked LM) and a tiny
    encoder-decoder (span corruption) with the demo's BPE tokenizer (the encoder uses it RoBERTa-style, with an
    added <|mask|>). Data: the standard library's top-level modules, the part of the built-in corpus that is
    ordinary code (its packages open with codec tables and test data, poor teachers for a few minutes of
    training). Returns, per family, the validation loss before and after, and a greedy sample from the
    decoder (a model this small repeats itself under greedy decoding; the loss drop is the point). `dtype`:
    the compute dtype of all three (auto: what this machine computes fast, see common.resolve_dtype).
    `families`: which of the three to train (benchmarks/bench_serve.py trains only the decoder)."""
    from glassmind import tokenizer as tok_lib
    from glassmind.model import load_model
    from glassmind.recipes.pretrain import CONFIG_FILE, PretrainConfig, pretrain

    if budget not in DEMO_BUDGETS:
        raise GlassmindError(f"budget {budget!r}: use one of {', '.join(DEMO_BUDGETS)}")
    dec_kw, small_kw = DEMO_BUDGETS[budget]
    out_dir = Path(out_dir)
    results: dict[str, Any] = {}
    for arch, name, kw in (("decoder", "pretrain-decoder", dec_kw), ("encoder", "pretrain-encoder", small_kw),
                           ("encoder-decoder", "pretrain-encoder-decoder", small_kw)):
        if arch not in families:
            continue
        run = out_dir / name
        data = [os.path.join(sysconfig.get_paths()["stdlib"], "*.py")]
        if arch == "decoder":  # the base model of the alignment stage: it must have read the fictional
            # world that the built-in tasks ask about (~10% of its data), or those questions are guesses
            from glassmind.data.tasks import write_world_corpus

            data.append(str(write_world_corpus(out_dir / "world.txt", repeats=80)))
        kw = {"data": data, **kw, "dtype": dtype}
        cfg = PretrainConfig(out=str(run), arch=arch, tokenizer=str(tokenizer_dir), ckpt_every=0, keep_last=1,
                             resume=(run / CONFIG_FILE).exists(), **kw)
        summary = pretrain(cfg)
        results[arch] = {"run": str(run), "val_loss_before": summary["val_loss_start"],
                         "val_loss_after": summary["val_loss"], "parameters": summary["parameters"],
                         "tokens": summary["tokens"], "seconds": summary["seconds"], "dtype": summary["dtype"]}
    dec_run = out_dir / "pretrain-decoder"
    if "decoder" in results:
        results["decoder"]["sample"] = greedy_sample(load_model(dec_run), tok_lib.load(dec_run), "def __init__(self")
    return results


def stage_pretrain(out: Path, budget: str, dtype: str = "auto") -> dict:
    """A small decoder, encoder and encoder-decoder, each with its self-supervised objective."""
    results = pretrain_stage(out, out / "tokenizer-bpe", budget=budget, dtype=dtype)
    print("\n| family | objective | dtype | parameters | tokens | val loss before | val loss after | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    objectives = {"decoder": "causal LM", "encoder": "masked LM", "encoder-decoder": "span corruption"}
    for arch, r in results.items():
        print(f"| {arch} | {objectives[arch]} | {r['dtype']} | {r['parameters']:,} | {r['tokens']:,} | "
              f"{r['val_loss_before']:.3f} | {r['val_loss_after']:.3f} | {r['seconds']:.0f} |")
    print(f"\ndecoder sample (greedy): {results['decoder']['sample']!r}")
    return results


def demo_strategies():
    """The decoding strategies the demo compares (name, SamplingParams)."""
    from glassmind.infer import SamplingParams

    return (
        ("greedy", SamplingParams(strategy="greedy")),
        ("beam (4)", SamplingParams(strategy="beam", num_beams=4)),
        ("sample (T=0.8, top-p 0.95)", SamplingParams(strategy="sample", temperature=0.8, top_p=0.95, seed=0)),
        ("sample (T=1, min-p 0.05, rep 1.2)", SamplingParams(strategy="sample", min_p=0.05,
                                                             repetition_penalty=1.2, seed=0)),
    )


def generate_stage(run_dir: str | Path, prompts: list[str], *, max_new_tokens: int = 48) -> str:
    """Generate from a decoder run under each strategy (all prompts as one batch) and return a table of the
    completions and their metrics, for `glassmind demo` to print."""
    from glassmind.infer import Engine, SamplingParams
    from glassmind.infer.generate import encode_prompt, load_run, stop_ids

    model, tok = load_run(run_dir, device="cpu")
    engine = Engine(model)
    eos = stop_ids(tok)
    ids = [encode_prompt(tok, p) for p in prompts]
    rows = []
    for name, base in demo_strategies():
        params = SamplingParams(**{**base.__dict__, "max_new_tokens": max_new_tokens, "eos_token_ids": eos,
                                   "top_logprobs": 0})
        for p, r in zip(prompts, engine.generate(ids, params)):
            m = r.metrics
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in p + tok.decode(r.content_ids))
            text = text.replace("|", "/").replace("`", "'")  # keep the markdown table intact
            rows.append((name, text[:60] + ("..." if len(text) > 60 else ""), m.new_tokens,
                         1000 * m.ttft_s, 1000 * (m.itl_p50_s or 0.0), m.tokens_per_s,
                         sum(r.logprobs) / max(1, len(r.logprobs))))
    head = ("strategy", "text", "new", "TTFT ms", "ITL p50 ms", "tok/s", "mean logprob")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, text, n, ttft, itl, tps, lp in rows:
        lines.append(f"| {name} | `{text}` | {n} | {ttft:.1f} | {itl:.2f} | {tps:.0f} | {lp:.2f} |")
    return "\n".join(lines)


def stage_generate(out: Path) -> str:
    """The demo decoder under each decoding strategy, with time to first token and inter-token latency."""
    table = generate_stage(out / "pretrain-decoder", ["def __init__(self", "import ", "class "])
    print(table)
    return table


def stage_align(out: Path, budget: str, dtype: str = "auto") -> dict:
    """SFT, reward model, PPO and DPO from the demo decoder; prints the held-out accuracy table. `dtype`: the
    demo's --dtype (fp16, a GPU's pre-training dtype with a loss scaler, which these verbs lack: auto)."""
    from glassmind.studies.alignment import alignment_stage

    return alignment_stage(out / "pretrain-decoder", out / "align", budget=budget,
                           dtype="auto" if dtype == "fp16" else dtype)


def stage_autopsy(out: Path, budget: str) -> dict:
    """The autopsy of the demo decoder on a prompt it gets right, and the induction-head study (a model trained on
    in-context copying, its head found, ablated and watched forming across checkpoints)."""
    from glassmind.studies.induction import demo_stage

    result = demo_stage(out / "pretrain-decoder", out / "autopsy", budget=budget)
    dec = result.get("decoder")
    if dec:
        print(f"decoder on {dec['prompt']!r} ({'right' if dec['right'] else 'no prompt it gets right was found'}):")
        for line in dec["narration"]:
            print(f"  {line}")
        print(f"  report: {dec['report']}")
    print("induction study:")
    for line in result["induction"]["summary"]:
        print(f"  {line}")
    return result


def stage_evals(out: Path, budget: str) -> dict:
    """The limits evals at their quick budget on the demo's final (DPO) run, calibration through the lifecycle
    (base 3-shot, SFT, PPO, DPO), then the DPO run's report card. At the tiny budget only calibration runs (the
    other suites train small models of their own: minutes)."""
    from glassmind.evals.cli import quick_suite, run_suite
    from glassmind.evals.report import build

    run = out / "align" / "dpo"
    if budget == "tiny":
        results = {"calibration": run_suite("calibration", [run], run / "evals" / "calibration", "quick")}
    else:
        results = quick_suite(run, run / "evals")
    # calibration through the lifecycle: the base model (3-shot), SFT, PPO and DPO side by side
    stages = [out / "pretrain-decoder"] + [out / "align" / s for s in ("sft", "ppo", "dpo")]
    where = run / "evals" / "calibration-lifecycle"
    results["calibration-lifecycle"] = run_suite(
        "calibration", stages, where, "quick",
        command=f"glassmind eval {' '.join(map(str, stages))} --suite calibration --budget quick --out {where}")
    for suite, result in results.items():
        if isinstance(result, dict) and result.get("error"):
            print(f"  {suite}: {result['error']}")
    card = build(run)
    print(f"report card: {card['report']}")
    return {"suites": sorted(k for k in results if k != "seconds"), "report": str(card["report"]),
            "seconds": results.get("seconds") if isinstance(results, dict) else None}


def serve_command(out: Path) -> str:
    runs = [out / "align" / name for name in ("sft", "ppo", "dpo")] + [out / "pretrain-decoder"]
    return ("glassmind serve " + " ".join(str(r) for r in runs if (r / "config.json").exists())
            + " --port 8000   (then open http://127.0.0.1:8000/)")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="glassmind demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where every stage writes its run (default runs/demo)")
    p.add_argument("--corpus-mb", type=float, default=8.0,
                   help="MB of the built-in corpus the tokenizers train on (default 8)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size (default 4096)")
    p.add_argument("--budget", choices=("small", "tiny"), default="small",
                   help="training budget: small (the demo, minutes) or tiny (seconds: a smoke test)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype of pre-training and alignment (default auto: bf16 where this machine "
                        "computes it natively, else fp32; fp16: pre-training only)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # said once, up front: a demo that crawls is most often bf16 on a CPU that emulates it (issue 13)
    dtype, reason = resolve_dtype(args.dtype, pick_device("auto"))
    print(f"CPU: {cpu_summary()}; training in {dtype_name(dtype)}", flush=True)
    summary: dict = {"cpu": cpu_summary(), "dtype": dtype_name(dtype), "dtype_reason": reason}

    banner("1. Tokenizers: byte-level BPE and WordPiece on the built-in corpus")
    summary["tokenizers"] = stage_tokenizers(out, int(args.corpus_mb * 1e6), args.vocab_size)

    banner("2. Pre-training: decoder (causal LM), encoder (masked LM), encoder-decoder (span corruption)")
    summary["pretrain"] = stage_pretrain(out, args.budget, args.dtype)

    banner("3. Inference: prefill + KV cache decode under each strategy (metrics per request)")
    summary["generate"] = stage_generate(out)

    banner("4. Alignment: SFT -> reward model -> PPO and DPO on the built-in tasks (verifier accuracy)")
    summary["align"] = stage_align(out, args.budget, args.dtype)

    banner("5. Autopsy: inside the demo decoder's forward pass, and an induction head found, ablated, watched forming")
    summary["autopsy"] = stage_autopsy(out, args.budget)

    banner("6. Limits: calibration, hallucination, bias, position, reversal, arithmetic; the report card")
    summary["evals"] = stage_evals(out, args.budget)

    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    banner(f"done in {summary['seconds']:.0f} s. Results are in {out}/")
    for path in sorted(out.iterdir()):
        print(f"  {path}")
    print(f"\nThe report card of the final run: {summary['evals']['report']}")
    print(f"\nServe these runs (OpenAI-compatible API + a page to chat, see each token's probability, open the "
          f"autopsy, rank replies):\n  {serve_command(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
