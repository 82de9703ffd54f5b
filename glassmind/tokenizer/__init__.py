"""Tokenizers: byte-level BPE (GPT-style) and WordPiece (BERT-style), trained on any text.

`load(path)` returns whichever kind a directory or tokenizer.json holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from glassmind.common import GlassmindError
from glassmind.tokenizer.base import Tokenizer


def load(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a run directory, a `tokenizer.json`, or a BERT `vocab.txt`."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            path = path / "tokenizer.json"
        elif (path / "vocab.txt").exists():
            path = path / "vocab.txt"
        else:
            raise GlassmindError(f"{path} holds no tokenizer.json (or vocab.txt): train one with "
                                 "`glassmind tokenizer train --out DIR`")
    if not path.exists():
        raise GlassmindError(f"no tokenizer at {path}")
    if path.name.endswith(".txt"):
        from glassmind.tokenizer.wordpiece import WordPieceTokenizer

        return WordPieceTokenizer.from_vocab_file(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GlassmindError(f"{path} is not a valid tokenizer.json: {e}") from None
    kind = (doc.get("model") or {}).get("type")
    if kind == "BPE":
        from glassmind.tokenizer.bpe import BPETokenizer

        return BPETokenizer.from_hf_json(doc)
    if kind == "WordPiece":
        from glassmind.tokenizer.wordpiece import WordPieceTokenizer

        return WordPieceTokenizer.from_hf_json(doc)
    raise GlassmindError(f"{path}: tokenizer model type {kind!r} is not supported (BPE or WordPiece)")


__all__ = ["Tokenizer", "load"]
