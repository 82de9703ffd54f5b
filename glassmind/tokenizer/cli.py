"""`glassmind tokenizer`: train a byte-level BPE or WordPiece tokenizer on a corpus; encode text with one.

    glassmind tokenizer train --kind bpe --vocab-size 8192 --out runs/tok-bpe            # built-in corpus
    glassmind tokenizer train --kind wordpiece --vocab-size 8192 --input notes/ data.jsonl:body --out runs/wp
    glassmind tokenizer encode runs/tok-bpe "Hello, world!"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from glassmind.common import GlassmindError, run_main

BPE_MIN_VOCAB = 257  # the 256 byte tokens and <|endoftext|>


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


def parser() -> argparse.ArgumentParser:
    from glassmind.data.corpus import SOURCE_FORMS

    p = argparse.ArgumentParser(prog="glassmind tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,encode}")

    t = sub.add_parser("train", help="train a tokenizer and save DIR/tokenizer.json",
                       description="Train a tokenizer on the built-in corpus (no --input) or your text; save "
                                   "OUT/tokenizer.json (Hugging Face tokenizers format).")
    t.add_argument("--kind", choices=("bpe", "wordpiece"), required=True,
                   help="bpe: GPT-style byte-level BPE; wordpiece: BERT-style WordPiece")
    t.add_argument("--vocab-size", type=int, required=True, help="number of tokens, special tokens included")
    t.add_argument("--pattern", choices=("gpt4", "gpt2"), default="gpt4",
                   help="BPE pre-tokenization regex (default gpt4, the cl100k-style one)")
    t.add_argument("--input", nargs="+", metavar="PATH", help=f"training text: {SOURCE_FORMS}")
    t.add_argument("--max-bytes", type=int, help="train on at most this many UTF-8 bytes of the corpus")
    t.add_argument("--cased", action="store_true", help="WordPiece: keep case and accents (BERT-cased)")
    t.add_argument("--min-frequency", type=int,
                   help="WordPiece: merge only pairs seen this often (default: 1 per 100k words, at least 2)")
    t.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json into")
    t.set_defaults(run=train)

    e = sub.add_parser("encode", help="show the ids and pieces of a text",
                       description="Encode TEXT with the tokenizer in DIR; print each id beside its piece.")
    e.add_argument("dir", metavar="DIR", help="a folder with tokenizer.json (or vocab.txt), or the file itself")
    e.add_argument("text", metavar="TEXT", help='the text to encode ("-" reads standard input)')
    e.add_argument("--allow-special", action="store_true",
                   help="treat text spelling a special token (<|endoftext|>, [MASK]) as that token")
    e.set_defaults(run=encode)
    return p


def train(args: argparse.Namespace) -> int:
    from glassmind.data.corpus import CorpusStats, texts

    _check_train_args(args)
    stats = CorpusStats()
    stream = texts(args.input, max_bytes=args.max_bytes, stats=stats)  # checks the sources now
    what = ", ".join(args.input) if args.input else "the built-in corpus (Python standard library + pydoc topics)"
    print(f"training a {args.kind} tokenizer, vocab {args.vocab_size:,}, on {what}"
          + (f", first {args.max_bytes:,} bytes" if args.max_bytes else ""), flush=True)
    t0 = time.perf_counter()
    if args.kind == "bpe":
        from glassmind.tokenizer.bpe import BPETokenizer

        tok = BPETokenizer.train(stream, args.vocab_size, pattern=args.pattern)
    else:
        from glassmind.tokenizer.wordpiece import WordPieceTokenizer

        tok = WordPieceTokenizer.train(stream, args.vocab_size, lowercase=not args.cased,
                                       min_frequency=args.min_frequency)
    seconds = time.perf_counter() - t0
    path = tok.save(args.out)
    print(f"corpus: {stats.summary()}")
    print(f"trained {args.kind}: {tok.vocab_size:,} tokens in {seconds:.1f} s")
    print(f"saved {path}\ntry: glassmind tokenizer encode {args.out} \"Hello, world!\"")
    return 0


def _check_train_args(args: argparse.Namespace) -> None:
    """Fail on bad numbers and a bad --out before any text is read."""
    if args.kind == "bpe" and args.vocab_size < BPE_MIN_VOCAB:
        raise GlassmindError(f"--vocab-size {args.vocab_size} is too small for BPE: it needs the 256 byte "
                             f"tokens plus <|endoftext|>; use --vocab-size >= {BPE_MIN_VOCAB} (a few thousand "
                             "is typical)")
    if args.kind == "wordpiece" and args.vocab_size < 6:
        raise GlassmindError(f"--vocab-size {args.vocab_size} is too small for WordPiece: it needs 5 special "
                             "tokens and an alphabet; use a few thousand")
    if args.max_bytes is not None and args.max_bytes <= 0:
        raise GlassmindError(f"--max-bytes must be positive, got {args.max_bytes}")
    if args.min_frequency is not None and args.min_frequency < 1:
        raise GlassmindError(f"--min-frequency must be >= 1, got {args.min_frequency}")
    if args.kind == "bpe" and (args.cased or args.min_frequency is not None):
        raise GlassmindError("--cased and --min-frequency are WordPiece options; BPE keeps every byte as is")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise GlassmindError(f"--out {args.out} is a file; give a folder for tokenizer.json")


def encode(args: argparse.Namespace) -> int:
    from glassmind.tokenizer import load

    if not Path(args.dir).exists():
        raise GlassmindError(f"no tokenizer at {args.dir}: train one with `glassmind tokenizer train "
                             f"--kind bpe --vocab-size 8192 --out {args.dir}`")
    tok = load(args.dir)
    text = sys.stdin.read() if args.text == "-" else args.text
    ids = tok.encode(text, allowed_special="all" if args.allow_special else ())
    print(f"{tok.kind} tokenizer, vocab {tok.vocab_size:,}: {len(ids)} tokens for {len(text)} characters")
    show_text = tok.kind == "bpe"  # byte-level pieces (Ġ for a space) read better beside their text
    width = max([len(str(i)) for i in ids] + [2])
    print(f"{'id':>{width}}  piece" + ("                text" if show_text else ""))
    for i in ids:
        piece = _printable(tok.id_to_token(i))
        line = f"{i:>{width}}  {piece}"
        if show_text:
            line = f"{line:<{width + 22}} {tok.decode([i])!r}"
        print(line)
    return 0


def _printable(s: str) -> str:
    return s if s.isprintable() and s.strip() == s and s else repr(s)
