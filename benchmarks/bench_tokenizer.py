"""Byte-level BPE: training time against HF tokenizers' BpeTrainer, encode throughput against tiktoken and
HF tokenizers. Each pair runs alternately in this one process; medians and ratios are printed.

    python benchmarks/bench_tokenizer.py                   # whole built-in corpus, vocab 8192, 3 rounds
    python benchmarks/bench_tokenizer.py --max-mb 20       # a fixed prefix of it (the same for both sides)

Training: both sides get the same texts, the same pre-tokenizer (the Split regex + ByteLevel, exactly what
glassmind's tokenizer.json holds), the same vocab size (8192, <|endoftext|> included) and the 256 bytes
as the initial alphabet. Encoding: the ids of every side are checked equal before anything is timed.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

from glassmind.tokenizer import load
from glassmind.tokenizer.bpe import BPETokenizer
from glassmind.tokenizer.pretokenize import PATTERNS
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: the CPU, capability, bf16)



def corpus(max_mb: float | None) -> list[str]:
    """The built-in corpus (stdlib sources, then pydoc topics), cut after `max_mb` MB of UTF-8."""
    max_bytes = int(max_mb * 1e6) if max_mb else None
    try:
        from glassmind.data.corpus import texts

        return list(texts(max_bytes=max_bytes))
    except ImportError:
        return _stdlib_texts(max_bytes)


def _stdlib_texts(max_bytes: int | None) -> list[str]:
    """Fallback when glassmind.data.corpus is absent: the stdlib's .py files (site-packages excluded)."""
    import pathlib
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for f in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        text = f.read_bytes().decode("utf-8", errors="ignore")
        out.append(text)
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    return out


def hf_train(texts: list[str], vocab_size: int, pattern: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def timed(fn):
    gc.collect()  # every call starts from the same heap: no collection owed by the previous call
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def alternate(named: dict, rounds: int) -> dict[str, float]:
    """Run each callable once per round, in turn; median seconds per name."""
    times: dict[str, list[float]] = {k: [] for k in named}
    for _ in range(rounds):
        for k, fn in named.items():
            times[k].append(timed(fn)[0])
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-mb", type=float, default=None, help="train on this prefix of the corpus (MB)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--pattern", choices=list(PATTERNS), default="gpt4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--encode-mb", type=float, default=4.0, help="text encoded in the throughput test (MB)")
    ap.add_argument("--tokenizer", default=None,
                    help="skip the training comparison and measure encoding with this saved BPE tokenizer")
    args = ap.parse_args(argv)
    print(describe(), flush=True)

    import tiktoken  # noqa: F401  (fail early: both references are needed)
    import tokenizers

    texts = corpus(args.max_mb)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {len(texts):,} documents, {n_bytes / 1e6:.1f} MB; vocab {args.vocab_size}; "
          f"pattern {args.pattern}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}; "
          f"tokenizers {tokenizers.__version__}, tiktoken {tiktoken.__version__}", flush=True)

    if args.tokenizer:
        ours = load(args.tokenizer)
        print(f"tokenizer {args.tokenizer}: {ours}")
    else:
        ours = train_both(texts, args)
    encode_and_runs(ours, texts, args)
    return 0


def train_both(texts: list[str], args: argparse.Namespace) -> BPETokenizer:
    pattern = PATTERNS[args.pattern]
    trained = {}
    train = alternate({
        "glassmind": lambda: trained.__setitem__(
            "ours", BPETokenizer.train(texts, args.vocab_size, pattern=args.pattern, progress=False)),
        "hf tokenizers": lambda: trained.__setitem__("hf", hf_train(texts, args.vocab_size, pattern)),
    }, args.rounds)
    ours = trained["ours"]
    print(f"\ntrain, vocab {args.vocab_size} ({args.rounds} rounds, median s):")
    print(f"  glassmind      {train['glassmind']:8.2f} s")
    print(f"  hf tokenizers  {train['hf tokenizers']:8.2f} s")
    print(f"  ratio glassmind / hf = {train['glassmind'] / train['hf tokenizers']:.2f}x (target <= 5x)",
          flush=True)
    return ours


def encode_and_runs(ours: BPETokenizer, texts: list[str], args: argparse.Namespace) -> None:
    # The last documents of the corpus, up to --encode-mb, encoded by our trained tokenizer on every side.
    docs, size = [], 0
    for t in reversed(texts):
        docs.append(t)
        size += len(t.encode("utf-8"))
        if size >= args.encode_mb * 1e6:
            break
    enc = ours.to_tiktoken()
    hf = _hf_from(ours)
    want = [ours.encode(d) for d in docs]
    assert [enc.encode_ordinary(d) for d in docs] == want, "tiktoken ids differ"
    assert [e.ids for e in hf.encode_batch_fast(docs)] == want, "HF ids differ"
    assert ours.encode_batch(docs) == want, "fast path ids differ"

    threads = min(8, os.cpu_count() or 1)

    def pure_cold():
        ours._cache.clear()
        return [ours.encode(d) for d in docs]

    enc_t = alternate({
        "glassmind encode (pure Python, cold cache)": pure_cold,
        "glassmind encode (pure Python, warm cache)": lambda: [ours.encode(d) for d in docs],
        "glassmind encode_batch (tiktoken-routed, 1 thread)": lambda: ours.encode_batch(docs, num_threads=1),
        "tiktoken encode_ordinary (1 thread)": lambda: [enc.encode_ordinary(d) for d in docs],
        f"glassmind encode_batch (tiktoken-routed, {threads} threads)":
            lambda: ours.encode_batch(docs, num_threads=threads),
        f"tiktoken encode_ordinary_batch ({threads} threads)":
            lambda: enc.encode_ordinary_batch(docs, num_threads=threads),
        "hf tokenizers encode_batch_fast": lambda: hf.encode_batch_fast(docs),
    }, args.rounds)
    ref_batch = enc_t[f"tiktoken encode_ordinary_batch ({threads} threads)"]
    ref_one = enc_t["tiktoken encode_ordinary (1 thread)"]
    print(f"\nencode {size / 1e6:.1f} MB, {len(docs)} documents ({args.rounds} rounds, median):")
    for k, s in enc_t.items():
        print(f"  {k:52s} {size / s / 1e6:7.2f} MB/s   vs tiktoken batch {ref_batch / s:5.2f}x   "
              f"vs tiktoken 1 thread {ref_one / s:5.2f}x")

    # -- pathological runs: one long chunk each -----------------------------------------------------------
    print("\nlong runs, 1 MB (median s; each side checked equal to ours):")
    for name, text in (("1 MB of 'a'", "a" * (1 << 20)), ("1 MB of spaces", " " * (1 << 20)),
                       ("1 MB of '\\n'", "\n" * (1 << 20))):
        want = ours.encode(text)
        assert enc.encode_ordinary(text) == want and hf.encode(text).ids == want, name
        t = alternate({"glassmind": lambda: (ours._cache.clear(), ours.encode(text)),
                       "tiktoken": lambda: enc.encode_ordinary(text),
                       "hf tokenizers": lambda: hf.encode(text)}, args.rounds)
        print(f"  {name:16s} glassmind {t['glassmind']:6.3f}   tiktoken {t['tiktoken']:6.3f}   "
              f"hf tokenizers {t['hf tokenizers']:6.3f}")


def _hf_from(tok: BPETokenizer):
    import json

    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(json.dumps(tok.to_hf_json()))
    hf.encode_special_tokens = True
    return hf


if __name__ == "__main__":
    sys.exit(main())
