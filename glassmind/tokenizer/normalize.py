"""BERT's text normalisation and whitespace/punctuation pre-tokenization.

Follows Hugging Face tokenizers' `BertNormalizer` and `BertPreTokenizer` (the Rust code behind
`BertTokenizerFast`), which is what our parity tests pin to. They differ from the original Python
BERT (`tokenization.py` in google-research/bert, Devlin et al. 2018) in a few corners, and where they do
we follow tokenizers:

- "control" means general category Cc, Cf or Co (except \\t \\n \\r), plus NUL and U+FFFD; such characters
  are deleted. \\v, \\f and U+0085 are Cc, so they are deleted too, not turned into spaces.
- "whitespace" means the Unicode White_Space property (Rust's `char::is_whitespace`) plus \\t \\n \\r;
  what is left of it after deleting controls becomes a plain space.
- CJK ideographs get a space on each side. tokenizers' table has U+2B920..U+2CEAF where the original
  has U+2B820..U+2CEAF (U+2B820..U+2B91F are not split); we copy tokenizers.
- Lowercasing maps each character on its own (no final-sigma rule: "Σ" -> "σ" at a word's end too).

Character classes come from the running Python's `unicodedata` (Unicode 14.0 on Python 3.11), built once
on first use (a fraction of a second). tokenizers' category tables (the unicode_categories crate) are
older, so the two disagree on about 500 characters that were added or re-categorised since (new
punctuation such as U+2E43, new combining marks, U+1734 which became Mc): there we follow Python's
database. tests/test_wordpiece.py sweeps every assigned character to keep that list honest.
"""

from __future__ import annotations

import functools
import re
import unicodedata

# Unicode White_Space (PropList.txt), the set Rust's char::is_whitespace tests.
_WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")

# tokenizers' `is_chinese_char` (normalizers/bert.rs): the CJK Unified Ideographs blocks and extensions.
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))

ASCII_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _char_class(codepoints: list[int]) -> str:
    """A regex character class body for a sorted list of code points, written as ranges."""
    parts = []
    i = 0
    while i < len(codepoints):
        j = i
        while j + 1 < len(codepoints) and codepoints[j + 1] == codepoints[j] + 1:
            j += 1
        lo, hi = codepoints[i], codepoints[j]
        parts.append(re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
        i = j + 1
    return "".join(parts)


# Python's `re` tests a character class holding only BMP characters with a bitmap, but walks a list of
# ranges once the class holds astral ones (five times slower on the standard library). So each pattern is
# compiled three times, for text that is ASCII, within the BMP, or anything; `_tier` picks one per text.
_LIMITS = (0x80, 0x10000, 0x110000)


def _tier(text: str) -> int:
    if text.isascii():
        return 0
    return 1 if max(text) < "\U00010000" else 2


class _Tables:
    """Compiled regexes for each character class and tier; one instance per process (see `tables()`)."""

    def __init__(self) -> None:
        control, punct, nonspacing = [], [], []
        for cp in range(0x110000):
            cat = unicodedata.category(chr(cp))
            if cat in ("Cc", "Cf", "Co") and chr(cp) not in "\t\n\r":
                control.append(cp)
            elif cat[0] == "P" or chr(cp) in ASCII_PUNCTUATION:
                punct.append(cp)
            if cat == "Mn":
                nonspacing.append(cp)
        control = sorted(set(control) | {0, 0xFFFD})
        white = sorted(map(ord, _WHITE_SPACE))
        spaces = sorted(set(white) - set(control))
        cjk = [cp for lo, hi in CJK_RANGES for cp in range(lo, hi + 1)]

        def tiers(template: str, *classes: list[int]) -> tuple[re.Pattern, ...]:
            out = []
            for limit in _LIMITS:
                bodies = [_char_class([cp for cp in c if cp < limit]) or "\\x00" for c in classes]
                out.append(re.compile(template.format(*bodies)))
            return tuple(out)

        self.control = tiers("[{0}]+", control)
        self.space = tiers("[{0}]", spaces)
        self.cjk = tiers("[{0}]", cjk)
        self.nonspacing = tiers("[{0}]+", nonspacing)
        # a word is a run of neither whitespace nor punctuation; each punctuation character stands alone
        self.words = tiers("[{0}]|[^{0}{1}]+", punct, white)
        self.punct = re.compile(f"[{_char_class(punct)}]")


@functools.cache
def tables() -> _Tables:
    return _Tables()


def normalize(text: str, *, lowercase: bool = True, strip_accents: bool | None = None,
              clean_text: bool = True, handle_chinese_chars: bool = True) -> str:
    """BertNormalizer: clean, space out CJK, strip accents (NFD, drop Mn), lowercase, in that order.

    `strip_accents=None` follows `lowercase`, as in BERT.
    """
    text, tier = _normalize(text, lowercase, strip_accents, clean_text, handle_chinese_chars)
    if clean_text:
        text = tables().space[tier].sub(" ", text)
    return text


def _normalize(text: str, lowercase: bool, strip_accents: bool | None, clean_text: bool,
               handle_chinese_chars: bool) -> tuple[str, int]:
    """`normalize` without turning whitespace into spaces (splitting into words does not need it), and
    the tier of the result."""
    t = tables()
    tier = _tier(text)
    if strip_accents is None:
        strip_accents = lowercase
    if clean_text:
        text = t.control[tier].sub("", text)
    if tier:
        if handle_chinese_chars:
            text = t.cjk[tier].sub(r" \g<0> ", text)
        if strip_accents:
            text = unicodedata.normalize("NFD", text)
            tier = _tier(text)
            text = t.nonspacing[tier].sub("", text)
    if lowercase:
        # str.lower applies Unicode's final-sigma rule; tokenizers lowercases char by char, so a capital
        # sigma always becomes σ. Mapping Σ first makes lower() context-free.
        text = text.replace("Σ", "σ").lower() if tier else text.lower()
        tier = _tier(text) if tier else 0
    return text, tier


def pre_tokenize(text: str) -> list[str]:
    """BertPreTokenizer: split on whitespace (dropped) and punctuation (each mark its own word)."""
    return tables().words[_tier(text)].findall(text)


def words(text: str, *, lowercase: bool = True, strip_accents: bool | None = None, clean_text: bool = True,
          handle_chinese_chars: bool = True) -> list[str]:
    """pre_tokenize(normalize(text)) in one pass over the character-class tiers (what encoding and
    training use)."""
    text, tier = _normalize(text, lowercase, strip_accents, clean_text, handle_chinese_chars)
    return tables().words[tier].findall(text)


def is_punctuation(ch: str) -> bool:
    """BERT's _is_punctuation: ASCII non-alphanumeric printable marks and Unicode P* categories."""
    return tables().punct.fullmatch(ch) is not None
