"""`glassmind demo`: every lifecycle stage that exists, in order, on built-in data, into runs/demo/.

    1. tokenizers   byte-level BPE and WordPiece trained on the built-in corpus
    2. pre-training a small decoder (causal LM), encoder (masked LM), encoder-decoder (span corruption)
    3. inference    generations from the decoder under each decoding strategy, with latency metrics
    4. alignment    SFT, reward model, PPO and DPO on the built-in tasks

Each stage is a function of the verb that owns it; the demo only calls them in order and keeps a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from glassmind.common import (DTYPE_CHOICES, atomic_write_text, cpu_summary, dtype_name, pick_device, resolve_dtype,
                              run_main)

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


def stage_pretrain(out: Path, budget: str, dtype: str = "auto") -> dict:
    """A small decoder, encoder and encoder-decoder, each with its self-supervised objective."""
    from glassmind.train.pretrain import demo_stage

    results = demo_stage(out, out / "tokenizer-bpe", budget=budget, dtype=dtype)
    print("\n| family | objective | dtype | parameters | tokens | val loss before | val loss after | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    objectives = {"decoder": "causal LM", "encoder": "masked LM", "encoder-decoder": "span corruption"}
    for arch, r in results.items():
        print(f"| {arch} | {objectives[arch]} | {r['dtype']} | {r['parameters']:,} | {r['tokens']:,} | "
              f"{r['val_loss_before']:.3f} | {r['val_loss_after']:.3f} | {r['seconds']:.0f} |")
    print(f"\ndecoder sample (greedy): {results['decoder']['sample']!r}")
    return results


def stage_generate(out: Path) -> str:
    """The demo decoder under each decoding strategy, with time to first token and inter-token latency."""
    from glassmind.infer.cli import demo_stage

    table = demo_stage(out / "pretrain-decoder", ["def __init__(self", "import ", "class "])
    print(table)
    return table


def stage_align(out: Path, budget: str) -> dict:
    """SFT, reward model, PPO and DPO from the demo decoder; prints the held-out accuracy table."""
    from glassmind.train.align_demo import demo_stage

    return demo_stage(out / "pretrain-decoder", out / "align", budget=budget)


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
                   help="pre-training compute dtype (default auto: bf16 where this machine computes it natively, "
                        "else fp32)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # said once, up front: a demo that crawls is most often bf16 on a CPU that emulates it (issue 13)
    dtype, reason = resolve_dtype(args.dtype, pick_device("auto"))
    print(f"CPU: {cpu_summary()}; pre-training in {dtype_name(dtype)}", flush=True)
    summary: dict = {"cpu": cpu_summary(), "dtype": dtype_name(dtype), "dtype_reason": reason}

    banner("1. Tokenizers: byte-level BPE and WordPiece on the built-in corpus")
    summary["tokenizers"] = stage_tokenizers(out, int(args.corpus_mb * 1e6), args.vocab_size)

    banner("2. Pre-training: decoder (causal LM), encoder (masked LM), encoder-decoder (span corruption)")
    summary["pretrain"] = stage_pretrain(out, args.budget, args.dtype)

    banner("3. Inference: prefill + KV cache decode under each strategy (metrics per request)")
    summary["generate"] = stage_generate(out)

    banner("4. Alignment: SFT -> reward model -> PPO and DPO on the built-in tasks (verifier accuracy)")
    summary["align"] = stage_align(out, args.budget)

    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    banner(f"done in {summary['seconds']:.0f} s. Results are in {out}/")
    for path in sorted(out.iterdir()):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
