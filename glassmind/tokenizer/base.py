"""The seam every tokenizer shares (after minbpe's base.py): train, encode, decode, save, load.

A tokenizer maps text to ids and back. Both kinds (byte-level BPE, WordPiece) save one file,
`tokenizer.json`, in Hugging Face tokenizers' format, so `tokenizers.Tokenizer.from_file` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence


class Tokenizer:
    """Interface of every glassmind tokenizer. Subclasses implement the methods that raise."""

    kind: str = "base"  # "bpe" | "wordpiece"

    # -- ids <-> text ---------------------------------------------------------------------------------
    def encode(self, text: str, *, allowed_special: str | Iterable[str] = ()) -> list[int]:
        """Text -> ids. Text that spells a special token is ordinary text unless listed in
        `allowed_special` (or "all"), as tiktoken does."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], *, allowed_special: str | Iterable[str] = ()) -> list[list[int]]:
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    # -- vocabulary -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        """A printable name for one id (for showing pieces; not for decoding)."""
        raise NotImplementedError

    # -- files ------------------------------------------------------------------------------------------
    def to_hf_json(self) -> dict:
        """The Hugging Face tokenizers `tokenizer.json` document."""
        raise NotImplementedError

    @classmethod
    def from_hf_json(cls, doc: dict) -> "Tokenizer":
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/tokenizer.json` atomically; returns its path."""
        from glassmind.common import atomic_write_json

        return atomic_write_json(Path(directory) / "tokenizer.json", self.to_hf_json())

    def fingerprint(self) -> str:
        """A short hash of the tokenizer's whole definition (shard manifests record it)."""
        import hashlib

        blob = json.dumps(self.to_hf_json(), sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]
