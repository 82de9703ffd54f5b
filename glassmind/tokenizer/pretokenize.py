"""Pre-tokenization for byte-level BPE: the regex that cuts text into chunks, and the byte <-> unicode table.

BPE merges never cross a chunk boundary, so the regex decides what a token can be: "hello" and " world"
are chunks, so " world" can become one token but "o w" never can (Radford et al. 2019, GPT-2 paper, 2.2).

The same pattern string runs in three regex engines: Python's `regex` (ours), fancy-regex (tiktoken) and
Oniguruma (HF tokenizers). It must mean the same in all three, which is why GPT4_PATTERN writes
`\\p{N}{1,3}` where tiktoken's cl100k_base writes `\\p{N}{1,3}+`: in Oniguruma's Ruby syntax `{1,3}+` is
not possessive but "one or more groups of 1-3 digits", so HF would keep a whole run of digits together.
Both patterns match the same chunks (nothing can follow the digits inside that alternative).

Both patterns run in linear time on long runs of one character (the `\\s+(?!\\S)` alternative backtracks
at most one character per match), and every character of any text is matched by some alternative, so
the chunks of a text concatenate back to the text.
"""

from __future__ import annotations

import functools

import regex

from glassmind.common import GlassmindError

# GPT-2 (Radford et al. 2019, openai/gpt-2 encoder.py), contractions written as one group.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4 / cl100k_base (tiktoken 0.14), with `\p{N}{1,3}` for Oniguruma (see the module docstring).
# Differences from GPT-2: case-insensitive contractions, a letter run may take one leading non-letter,
# numbers in groups of at most 3 digits, newlines kept with the whitespace before them.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}


def pattern_for(name: str) -> str:
    """"gpt2" | "gpt4" -> the regex string."""
    try:
        return PATTERNS[name]
    except KeyError:
        raise GlassmindError(f"unknown pre-tokenization pattern {name!r}: use one of "
                             f"{', '.join(PATTERNS)}") from None


@functools.lru_cache(maxsize=16)
def compile_pattern(pattern: str) -> regex.Pattern:
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise GlassmindError(f"pre-tokenization regex {pattern!r} does not compile: {e}") from None


def split(text: str, pattern: str) -> list[str]:
    """Text -> its chunks, in order."""
    return compile_pattern(pattern).findall(text)


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters that stand for the 256 bytes in a byte-level vocabulary.

    GPT-2's table (openai/gpt-2 encoder.py, also HF ByteLevel): printable Latin-1 bytes stand for
    themselves; the 68 others (controls, space, soft hyphen, ...) get chr(256), chr(257), ... in byte
    order, so a space is 'Ġ' (chr(288)) and a newline 'Ċ' (chr(266)). Every token is then a visible string
    that JSON and merges files ("a b", space-separated) store safely.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


BYTE_TO_CHAR: list[str] = _bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def bytes_to_symbols(b: bytes) -> str:
    """Raw bytes -> the byte-level string HF tokenizer.json files use (b" hi" -> "Ġhi")."""
    return "".join([BYTE_TO_CHAR[x] for x in b])


def symbols_to_bytes(s: str) -> bytes:
    """Inverse of bytes_to_symbols; a character outside the table is a GlassmindError."""
    try:
        return bytes([CHAR_TO_BYTE[c] for c in s])
    except KeyError as e:
        raise GlassmindError(f"{s!r} is not a byte-level token: character {e.args[0]!r} stands for no byte "
                             "(is this a byte-level BPE tokenizer.json?)") from None
