"""Incremental detokenization: text pieces for a stream of token ids, never half a character.

A byte-level BPE token is a run of bytes, not of characters: "é" (0xC3 0xA9) may be split over two tokens,
and an emoji over up to four. Decoding each token alone would print U+FFFD for the halves. We keep the
bytes of the tokens seen so far in an incremental UTF-8 decoder, which emits only complete characters and
holds back an unfinished one until its last byte arrives; invalid bytes become U+FFFD exactly as a one-shot
`bytes.decode("utf-8", errors="replace")` of the whole sequence would make them.

Tokenizers without `decode_bytes` (WordPiece, whose decode joins and strips "##" pieces) are handled by
decoding the whole id list and emitting what was added since last time (the approach of transformers'
TextStreamer); text that ends in U+FFFD or that rewrites what was already emitted is held back.
"""

from __future__ import annotations

import codecs
from typing import Any, Iterable


class Detokenizer:
    """`push(id) -> str` gives the new text (possibly ""), `flush() -> str` the rest at the end.

    skip_special: special tokens (`<|endoftext|>`, chat markers) print nothing, so a stop marker never
    reaches the reader."""

    def __init__(self, tokenizer: Any, *, skip_special: bool = True):
        self.tokenizer = tokenizer
        specials = getattr(tokenizer, "special_tokens", None) or {}
        self.skip = frozenset(specials.values()) if skip_special else frozenset()
        self.byte_level = callable(getattr(tokenizer, "decode_bytes", None))
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []     # text-diff mode: every id so far
        self._emitted = ""            # text-diff mode: what has been returned

    def push(self, token: int) -> str:
        if token in self.skip:
            return ""
        if self.byte_level:
            return self._utf8.decode(self.tokenizer.decode_bytes([token]))
        self._ids.append(token)
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""
        new, self._emitted = text[len(self._emitted):], text
        return new

    def push_many(self, tokens: Iterable[int]) -> str:
        return "".join(self.push(t) for t in tokens)

    def flush(self) -> str:
        """What is still held back (an unfinished character becomes U+FFFD); the detokenizer is reset."""
        if self.byte_level:
            rest = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return rest
        text = self.tokenizer.decode(self._ids)
        rest = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._ids, self._emitted = [], ""
        return rest
