"""Byte-level BPE (Sennrich et al. 2016 on bytes, as GPT-2 does it): train, encode, decode, export.

Ids: 0..255 are the bytes, 256 + i is merge i (in the order training found them), then the special tokens.
A merge (a, b) -> 256 + i always joins two older ids, so a token's rank is its id, exactly as tiktoken's
`mergeable_ranks` expect.

Encoding a chunk repeatedly joins the adjacent pair with the lowest merge rank (leftmost first among
equal ranks), which is HF tokenizers' BPE model. tiktoken instead joins the adjacent pair whose
*concatenated bytes* have the lowest rank. The two agree on every input for a vocabulary trained here,
because training applies merges within each chunk by the same rule encoding does: a span that became token
t in training becomes t whenever it is encoded on its own, so every adjacent pair whose bytes form a token
is that token's own merge, and no two merges make the same bytes. The parity tests check it on megabytes.
"""

from __future__ import annotations

import heapq
import os
import warnings
from collections import Counter, defaultdict
from itertools import chain
from typing import Iterable, Iterator, Mapping, Sequence

import regex

from glassmind.common import GlassmindError
from glassmind.tokenizer.base import Tokenizer
from glassmind.tokenizer.pretokenize import (PATTERNS, bytes_to_symbols, compile_pattern, pattern_for,
                                             symbols_to_bytes)

DEFAULT_SPECIALS = ("<|endoftext|>",)
_SHORT = 16         # chunks up to this many bytes merge by rescanning; longer ones use rank buckets
_HUGE = 4096        # chunks of this many bytes or more start with bulk str.replace passes
_CACHE_MAX = 1 << 18  # chunk -> ids entries kept before the cache is emptied and refilled
_CACHE_CHUNK = 64   # longer chunks are not cached (a 1 MB run of spaces should not sit in memory)
_SURROGATE = regex.compile(r"[\ud800-\udfff]")


class LoneSurrogateError(GlassmindError, ValueError):
    """The text holds a lone surrogate (U+D800..U+DFFF): not valid Unicode, so it has no UTF-8 bytes."""


def _surrogate_error(text: str) -> LoneSurrogateError:
    m = _SURROGATE.search(text)
    where = f" U+{ord(m.group()):04X} at index {m.start()}" if m else ""
    return LoneSurrogateError(
        f"text holds a lone surrogate{where}: it is not valid Unicode and has no UTF-8 bytes. Fix it where "
        "the text was decoded (e.g. open files with errors='replace'), or pass the raw bytes to encode_bytes()")


# ----------------------------------------------------------------------------------------------------
# training


def count_chunks(texts: Iterable[str], pattern: str, *, progress: bool = True) -> Counter:
    """Pre-tokenize every text once: chunk -> how many times it occurs in the corpus."""
    from tqdm.auto import tqdm

    findall = compile_pattern(pattern).findall
    counts: Counter = Counter()
    bar = tqdm(desc="pre-tokenizing", unit=" chars", unit_scale=True, disable=not progress)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise GlassmindError(f"training text #{i} is a {type(text).__name__}, not a str")
        counts.update(findall(text))  # Counter.update on a list counts in C
        bar.update(len(text))
    bar.close()
    return counts


def learn_merges(chunk_counts: Mapping[str, int], num_merges: int, *,
                 progress: bool = True) -> list[tuple[int, int]]:
    """The classic BPE loop over unique chunks, with incremental pair counts.

    Each unique chunk is a word: a list of ids, weighted by how often the chunk occurs. `stats[pair]` is the
    weighted count of adjacent occurrences (overlapping ones too: "aaa" holds (a, a) twice), `where[pair]`
    the words that may contain it (stale entries are skipped, never removed). A merge rewrites only the
    words in `where[pair]` and adjusts the counts of the pairs beside each occurrence, so the cost of a
    merge is the number of its occurrences, not the corpus size.

    Choosing the next merge: a max-heap of (count, pair) with lazy invalidation. Every count change pushes
    a fresh entry; a popped entry whose count is no longer current is dropped.

    Tie-break (deterministic, documented): the highest count wins; among equal counts, the smallest
    (a, b) id pair, compared as a tuple (a first). Merges depend only on the multiset of chunks, not on
    the order of the corpus.
    """
    from tqdm.auto import tqdm

    words: list[list[int]] = []
    freqs: list[int] = []
    for chunk, f in chunk_counts.items():
        try:
            b = chunk.encode("utf-8")
        except UnicodeEncodeError:
            raise _surrogate_error(chunk) from None
        if len(b) > 1:
            words.append(list(b))
            freqs.append(f)

    stats: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            stats[pair] += f
            where[pair].add(i)
    stats = dict(stats)
    heap = [(-c, a, b) for (a, b), c in stats.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=num_merges, desc="merging", unit=" merges", disable=not progress)
    while len(merges) < num_merges and heap:
        neg, a, b = heapq.heappop(heap)
        if stats.get((a, b)) != -neg:
            continue  # stale entry: the pair's count changed after it was pushed
        new = 256 + len(merges)
        merges.append((a, b))
        touched = _apply_merge(words, freqs, where.pop((a, b)), a, b, new, stats, where)
        for pair in touched:
            c = stats[pair]
            if c > 0:
                heapq.heappush(heap, (-c, pair[0], pair[1]))
            else:
                del stats[pair]
        bar.update(1)
    bar.close()
    return merges


def _apply_merge(words: list[list[int]], freqs: list[int], indices: set[int], a: int, b: int, new: int,
                 stats: dict[tuple[int, int], int], where: dict[tuple[int, int], set[int]]) -> set:
    """Rewrite (a, b) -> new in the given words, left to right, and move the neighbouring pair counts.

    For an occurrence x a b y: (x, a) -> (x, new) and (b, y) -> (new, y). When the previous occurrence was
    just merged, x is already `new` (its right-hand update turned (b, a) into (new, a)), so "a b a b"
    ends with (new, new) counted once and (b, a) gone, as a recount would give.
    """
    touched = set()
    for i in indices:
        w = words[i]
        n = len(w)
        f = freqs[i]
        out: list[int] = []
        j = 0
        found = False
        while j < n:
            if w[j] == a and j + 1 < n and w[j + 1] == b:
                found = True
                if out:
                    x = out[-1]
                    stats[(x, a)] -= f
                    stats[(x, new)] = stats.get((x, new), 0) + f
                    where[(x, new)].add(i)
                    touched.add((x, a))
                    touched.add((x, new))
                if j + 2 < n:
                    y = w[j + 2]
                    stats[(b, y)] -= f
                    stats[(new, y)] = stats.get((new, y), 0) + f
                    where[(new, y)].add(i)
                    touched.add((b, y))
                    touched.add((new, y))
                stats[(a, b)] -= f
                out.append(new)
                j += 2
            else:
                out.append(w[j])
                j += 1
        if found:
            words[i] = out
    touched.discard((a, b))
    stats.pop((a, b), None)
    return touched


# ----------------------------------------------------------------------------------------------------
# the tokenizer


class _ChunkCache(dict):
    """chunk -> its ids (a tuple). A miss runs BPE on the chunk's UTF-8 bytes (UnicodeEncodeError for a lone
    surrogate, so such a chunk is never stored); short chunks are kept, and the cache is emptied when full."""

    def __init__(self, bpe):
        super().__init__()
        self._bpe = bpe

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        # A tuple of ints, unlike a list, is untracked by the garbage collector once checked, so a full
        # cache does not slow down every later collection of the whole process.
        ids = tuple(self._bpe(list(chunk.encode("utf-8"))))
        if len(chunk) <= _CACHE_CHUNK:
            if len(self) >= _CACHE_MAX:
                self.clear()
            self[chunk] = ids
        return ids


class BPETokenizer(Tokenizer):
    """Byte-level BPE with a regex pre-tokenizer. Build it with `BPETokenizer.train(...)` or `load()`."""

    kind = "bpe"

    def __init__(self, merges: Sequence[tuple[int, int]], *, pattern: str = PATTERNS["gpt4"],
                 special_tokens: Sequence[str] = (), name: str = "glassmind_bpe"):
        """`merges`: (a, b) id pairs in rank order (merge i makes id 256 + i); `pattern`: the regex string."""
        self.name = name
        self._pattern = pattern
        self._findall = compile_pattern(pattern).findall
        self._known_pattern = pattern in PATTERNS.values()
        self._merges: list[tuple[int, int]] = []
        self._ranks: dict[tuple[int, int], int] = {}
        vocab = [bytes([i]) for i in range(256)]
        for i, (a, b) in enumerate(merges):
            a, b = int(a), int(b)
            new = 256 + i
            if not (0 <= a < new and 0 <= b < new):
                raise GlassmindError(f"merge #{i} ({a}, {b}) uses an id that does not exist before it "
                                     f"(merge #{i} makes id {new}): the merges are not in rank order")
            if (a, b) in self._ranks:
                raise GlassmindError(f"merge #{i} ({a}, {b}) repeats merge #{self._ranks[(a, b)]}")
            self._merges.append((a, b))
            self._ranks[(a, b)] = i
            vocab.append(vocab[a] + vocab[b])
        self._bytes_to_id = {tok: i for i, tok in enumerate(vocab)}
        if len(self._bytes_to_id) != len(vocab):
            raise GlassmindError("two merges make the same bytes: this merge list did not come from BPE "
                                 "training, and tiktoken (ranks keyed by bytes) could not represent it")
        self._id_bytes: list[bytes] = vocab  # id -> bytes, specials appended after the merges
        self._special: dict[str, int] = {}
        self._special_regex: dict[frozenset, regex.Pattern] = {}
        self._cache = _ChunkCache(self._bpe)
        self._tiktoken = None
        self.add_special_tokens(special_tokens)

    # -- training ---------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, pattern: str = "gpt4",
              special_tokens: Sequence[str] = DEFAULT_SPECIALS, progress: bool = True) -> "BPETokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `texts`.

        `pattern`: "gpt4" (cl100k-style) or "gpt2". `<|endoftext|>` (the document separator) is always
        registered, first; other `special_tokens` follow it. Text that spells a special token is trained
        on as ordinary text. If the corpus runs out of pairs first, the vocabulary comes out smaller (a
        warning).
        """
        regex_str = pattern_for(pattern)
        special_tokens = list(dict.fromkeys([*DEFAULT_SPECIALS, *special_tokens]))
        _check_specials(special_tokens)
        floor = 256 + len(special_tokens)
        if not isinstance(vocab_size, int) or vocab_size < floor:
            raise GlassmindError(f"vocab_size {vocab_size} is too small: byte-level BPE needs the 256 byte "
                                 f"tokens plus {len(special_tokens)} special token(s); use --vocab-size >= "
                                 f"{floor} (a few thousand is typical)")
        counts = count_chunks(texts, regex_str, progress=progress)
        if not counts:
            raise GlassmindError("the training corpus is empty: give texts with at least one character "
                                 "(check --input paths)")
        num_merges = vocab_size - floor
        merges = learn_merges(counts, num_merges, progress=progress)
        if len(merges) < num_merges:
            warnings.warn(f"the corpus has no pairs left after {len(merges)} merges: vocab_size is "
                          f"{floor + len(merges)}, not {vocab_size}", stacklevel=2)
        return cls(merges, pattern=regex_str, special_tokens=special_tokens)

    # -- encoding ---------------------------------------------------------------------------------------
    def encode(self, text: str, *, allowed_special: str | Iterable[str] = ()) -> list[int]:
        """Text -> ids (the pure-Python reference encoder).

        A special token's text is encoded as ordinary text unless it is in `allowed_special` (a set of
        special tokens, or "all"), as tiktoken's `encode(text, allowed_special=..., disallowed_special=())`.
        A lone surrogate in `text` raises LoneSurrogateError.
        """
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for piece, special in self._split_specials(text, allowed):
            if special:
                ids.append(self._special[piece])
            else:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Raw bytes -> ids, for any bytes (invalid UTF-8 too): `decode_bytes(encode_bytes(b)) == b`.

        Invalid bytes become lone surrogates under Python's "surrogateescape" (PEP 383), are cut by the
        regex like punctuation, and turn back into the same bytes. Valid UTF-8 gives `encode(b.decode())`.
        """
        text = bytes(data).decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        cache = self._cache
        for chunk in self._chunks(text):
            try:
                got = cache[chunk]
            except UnicodeEncodeError:  # holds escaped bytes: never cached, encode() must still refuse it
                got = self._bpe(list(chunk.encode("utf-8", errors="surrogateescape")))
            ids.extend(got)
        return ids

    def encode_batch(self, texts: Sequence[str], *, allowed_special: str | Iterable[str] = (),
                     fast: bool = True, num_threads: int | None = None) -> list[list[int]]:
        """Many texts -> ids. With `fast` and tiktoken installed, runs tiktoken's Rust encoder on this
        tokenizer's export (the parity tests prove it gives the ids `encode` gives), on `num_threads`
        threads (default: the CPU count, at most 8; tiktoken releases the GIL)."""
        texts = list(texts)
        enc = self._tiktoken_encoding() if fast else None
        if enc is None:
            return [self.encode(t, allowed_special=allowed_special) for t in texts]
        for t in texts:
            if not t.isascii():
                try:
                    t.encode("utf-8")  # tiktoken would silently replace a lone surrogate with U+FFFD
                except UnicodeEncodeError:
                    raise _surrogate_error(t) from None
        threads = num_threads or min(8, os.cpu_count() or 1)

        def ordinary_batch(items: list[str]) -> list[list[int]]:
            if threads == 1 or len(items) == 1:
                return [enc.encode_ordinary(t) for t in items]
            return enc.encode_ordinary_batch(items, num_threads=threads)

        allowed = self._allowed(allowed_special)
        if not allowed:
            return ordinary_batch(texts)
        # Specials are split here (longest first) so overlapping specials resolve as in `encode`.
        pieces = [list(self._split_specials(t, allowed)) for t in texts]
        ordinary = [p for ps in pieces for p, special in ps if not special]
        encoded = iter(ordinary_batch(ordinary))
        out = []
        for ps in pieces:
            ids: list[int] = []
            for p, special in ps:
                if special:
                    ids.append(self._special[p])
                else:
                    ids.extend(next(encoded))
            out.append(ids)
        return out

    def _chunks(self, text: str) -> list[str]:
        chunks = self._findall(text)
        # A pattern read from a file might skip characters; ours match every one (pretokenize.py).
        if not self._known_pattern and sum(map(len, chunks)) != len(text):
            raise GlassmindError(f"the pre-tokenization regex {self._pattern!r} skips characters of the "
                                 "text, which would be lost: use a pattern whose matches cover any text")
        return chunks

    def _encode_ordinary(self, text: str) -> list[int]:
        # A C-level loop: cache hits never run Python code; misses run _ChunkCache.__missing__.
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__, self._chunks(text))))
        except UnicodeEncodeError:
            raise _surrogate_error(text) from None

    def _bpe(self, ids: list[int]) -> list[int]:
        """One chunk's bytes -> token ids: join the lowest-rank adjacent pair, leftmost first, until no
        adjacent pair is a merge (HF tokenizers' BPE.merge_all, without dropout)."""
        if len(ids) <= _SHORT:
            return self._bpe_short(ids)
        if len(ids) >= _HUGE:
            ids, finished = self._bpe_dense(ids)
            if finished:
                return ids
        return self._bpe_buckets(ids)

    def _bpe_short(self, ids: list[int]) -> list[int]:
        # Rescan for the best pair, then join all its occurrences left to right. Joining them all at once
        # equals joining the leftmost one repeatedly: a pair that uses the new token ranks after it.
        rank = self._ranks.get
        inf = len(self._ranks)
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: rank(p, inf))
            r = rank(pair)
            if r is None:
                break
            a, b = pair
            new = 256 + r
            out = []
            i, n = 0, len(ids)
            while i < n:
                if ids[i] == a and i + 1 < n and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def _bpe_dense(self, ids: list[int]) -> tuple[list[int], bool]:
        """The first merges of a huge chunk (`ids`: its bytes; a long run: 1 MB of spaces), while dense.

        The chunk is held as a str with one character per token (chr(id)), so joining every occurrence
        of the best pair is one `str.replace`, which scans left to right without overlap: the leftmost-
        first rule, at C speed. A heap holds the ranks of the pairs that may be present; stale ones count
        zero. Once the best pair occurs in fewer than 1/128 of the positions, per-position work is cheaper
        and `_bpe_buckets` finishes the chunk. Returns the ids and whether no merge is left to do.
        """
        import numpy as np

        rank = self._ranks.get
        merges = self._merges
        arr = np.frombuffer(bytes(ids), dtype=np.uint8).astype(np.int64)
        present = np.flatnonzero(np.bincount(arr[:-1] * 256 + arr[1:], minlength=65536))
        heap = [r for r in (rank((int(c) >> 8, int(c) & 255)) for c in present) if r is not None]
        heapq.heapify(heap)
        queued = set(heap)
        s = bytes(ids).decode("latin-1")  # byte b -> chr(b)
        while heap:
            r = heap[0]
            a, b = merges[r]
            pair = chr(a) + chr(b)
            count = s.count(pair)
            if count and count * 128 < len(s):
                return list(map(ord, s)), False
            heapq.heappop(heap)
            queued.discard(r)
            if not count:
                continue
            new = chr(256 + r)
            s = s.replace(pair, new)
            parts = s.split(new)  # the text between occurrences of the new token: its neighbours
            left = {p[-1] for p in parts[:-1] if p}
            right = {p[0] for p in parts[1:] if p}
            if new + new in s:
                left.add(new)
            found = [rank((ord(x), 256 + r)) for x in left] + [rank((256 + r, ord(y))) for y in right]
            for r2 in found:
                if r2 is not None and r2 not in queued:
                    queued.add(r2)
                    heapq.heappush(heap, r2)
        return list(map(ord, s)), True

    def _bpe_buckets(self, ids: list[int]) -> list[int]:
        """O(n log n) for long chunks: a linked list over positions and a bucket of candidate positions
        per rank. Ranks are taken from a heap, lowest first; a bucket's positions
        are visited left to right and skipped when the pair there has changed (lazy invalidation). A join
        at rank r only creates pairs that rank after r, so a bucket never grows while it is processed."""
        rank = self._ranks.get
        merges = self._merges
        n = len(ids)
        tok = list(ids)                  # tok[i]: the token starting at position i; -1 once absorbed
        nxt = list(range(1, n + 1))      # next live position (n = none)
        prv = list(range(-1, n - 1))     # previous live position (-1 = none)
        buckets: dict[int, list[int]] = {}
        for i, pair in enumerate(zip(ids, ids[1:])):
            r = rank(pair)
            if r is not None:
                buckets.setdefault(r, []).append(i)
        heap = list(buckets)
        heapq.heapify(heap)
        push = heapq.heappush
        while heap:
            r = heapq.heappop(heap)
            positions = buckets.pop(r)
            positions.sort()
            a, b = merges[r]
            new = 256 + r
            for i in positions:
                if tok[i] != a:
                    continue
                j = nxt[i]
                if j >= n or tok[j] != b:
                    continue
                tok[i] = new
                tok[j] = -1
                k = nxt[j]
                nxt[i] = k
                if k < n:  # the pair (new, right neighbour) may be a merge
                    prv[k] = i
                    r2 = rank((new, tok[k]))
                    if r2 is not None:
                        bucket = buckets.get(r2)
                        if bucket is None:
                            buckets[r2] = [i]
                            push(heap, r2)
                        else:
                            bucket.append(i)
                p = prv[i]
                if p >= 0:  # the pair (left neighbour, new) may be a merge
                    r2 = rank((tok[p], new))
                    if r2 is not None:
                        bucket = buckets.get(r2)
                        if bucket is None:
                            buckets[r2] = [p]
                            push(heap, r2)
                        else:
                            bucket.append(p)
        return [t for t in tok if t >= 0]

    # -- special tokens -----------------------------------------------------------------------------------
    def add_special_tokens(self, tokens: Iterable[str]) -> None:
        """Register special tokens after the current vocabulary (new ids appended; known ones kept)."""
        tokens = [t for t in dict.fromkeys(tokens) if t not in self._special]
        _check_specials(tokens)
        for t in tokens:
            self._special[t] = len(self._id_bytes)
            self._id_bytes.append(t.encode("utf-8"))
        if tokens:
            self._special_regex.clear()
            self._tiktoken = None

    def _allowed(self, allowed_special: str | Iterable[str]) -> frozenset:
        if allowed_special == "all":
            return frozenset(self._special)
        if isinstance(allowed_special, str):
            allowed_special = (allowed_special,)
        allowed = frozenset(allowed_special)
        unknown = allowed - self._special.keys()
        if unknown:
            raise GlassmindError(f"allowed_special names {sorted(unknown)}, which are not special tokens of "
                                 f"this tokenizer ({sorted(self._special)}); add them with add_special_tokens")
        return allowed

    def _split_specials(self, text: str, allowed: frozenset) -> Iterator[tuple[str, bool]]:
        """(piece, is_special) in order; specials matched longest first where two could start at one place."""
        pat = self._special_regex.get(allowed)
        if pat is None:
            alternatives = sorted(allowed, key=lambda s: (-len(s), s))
            pat = self._special_regex[allowed] = regex.compile("|".join(map(regex.escape, alternatives)))
        pos = 0
        for m in pat.finditer(text):
            if m.start() > pos:
                yield text[pos:m.start()], False
            yield m.group(), True
            pos = m.end()
        if pos < len(text):
            yield text[pos:], False

    # -- decoding -----------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids -> the exact bytes they stand for (may be invalid UTF-8, e.g. half a character)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # numpy arrays and torch tensors
        table = self._id_bytes
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or not 0 <= i < len(table))
            raise GlassmindError(f"token id {bad!r} is not in this tokenizer (ids are 0..{len(table) - 1})") \
                from None

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Bytes that are not valid UTF-8 (a character cut between ids) become U+FFFD
        (errors="replace"), as tiktoken and HF do; use decode_bytes for the exact bytes."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- vocabulary -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """(a, b) id pairs in rank order: merge i makes id 256 + i."""
        return list(self._merges)

    @property
    def pattern(self) -> str:
        """The pre-tokenization regex."""
        return self._pattern

    def token_bytes(self, i: int) -> bytes:
        return self._id_bytes[i]

    def token_to_id(self, token: str) -> int | None:
        """A special token's text, or a token in byte-level form ("Ġthe" for b" the") -> its id."""
        if token in self._special:
            return self._special[token]
        try:
            return self._bytes_to_id.get(symbols_to_bytes(token))
        except GlassmindError:
            return None

    def id_to_token(self, i: int) -> str:
        """Id -> the token's byte-level form (as in tokenizer.json) or the special token's text."""
        if not 0 <= i < len(self._id_bytes):
            raise GlassmindError(f"token id {i} is not in this tokenizer (ids are 0..{len(self._id_bytes) - 1})")
        if i >= 256 + len(self._merges):
            return self._id_bytes[i].decode("utf-8")
        return bytes_to_symbols(self._id_bytes[i])

    # -- interop -------------------------------------------------------------------------------------------
    def to_hf_json(self) -> dict:
        """HF tokenizers' tokenizer.json: Split(regex, isolated) + ByteLevel(use_regex=False) pre-tokenizer,
        BPE model (byte-level vocab and merges as [a, b] lists), ByteLevel decoder, specials as added_tokens."""
        n_tokens = 256 + len(self._merges)
        sym = [bytes_to_symbols(self._id_bytes[i]) for i in range(n_tokens)]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for t, i in self._special.items()],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self._pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False,
                      "vocab": {s: i for i, s in enumerate(sym)},
                      "merges": [[sym[a], sym[b]] for a, b in self._merges]},
        }

    @classmethod
    def from_hf_json(cls, doc: dict) -> "BPETokenizer":
        """Read a tokenizer.json that glassmind wrote (byte-level BPE, ids laid out as in this module).

        Merges may be [a, b] lists (tokenizers >= 0.20) or "a b" strings (byte-level tokens hold no space).
        """
        model = doc.get("model") or {}
        if model.get("type") != "BPE":
            raise GlassmindError(f"tokenizer.json holds a {model.get('type')!r} model, not BPE")
        vocab: dict[str, int] = model.get("vocab") or {}
        for i in range(256):
            if vocab.get(bytes_to_symbols(bytes([i]))) != i:
                raise GlassmindError("this tokenizer.json is not laid out as glassmind's byte-level BPE (id i "
                                     "= byte i for 0..255, then one id per merge): loading it is not supported")
        merges = []
        for k, m in enumerate(model.get("merges") or []):
            try:
                left, right = m.split(" ") if isinstance(m, str) else m
            except ValueError:
                raise GlassmindError(f"tokenizer.json merge #{k} {m!r} is not a pair of tokens") from None
            pair = (vocab.get(left), vocab.get(right))
            if None in pair or vocab.get(left + right) != 256 + k:
                raise GlassmindError(f"tokenizer.json merge #{k} {left!r} + {right!r} does not make id "
                                     f"{256 + k}: not a glassmind byte-level BPE file")
            merges.append(pair)
        if len(vocab) != 256 + len(merges):
            raise GlassmindError(f"tokenizer.json has {len(vocab)} vocab entries for {len(merges)} merges; "
                                 f"glassmind's byte-level BPE has 256 + one per merge")
        pattern = _split_pattern(doc.get("pre_tokenizer"))
        added = sorted(doc.get("added_tokens") or [], key=lambda t: t["id"])
        specials = [t["content"] for t in added]
        for k, t in enumerate(added):
            if t["id"] != 256 + len(merges) + k:
                raise GlassmindError(f"added token {t['content']!r} has id {t['id']}, expected "
                                     f"{256 + len(merges) + k} (specials follow the merges)")
        return cls(merges, pattern=pattern, special_tokens=specials)

    def to_tiktoken(self):
        """A `tiktoken.Encoding` with this tokenizer's pattern, ranks (= ids) and special tokens."""
        try:
            import tiktoken
        except ImportError:
            raise GlassmindError("to_tiktoken needs tiktoken: pip install tiktoken") from None
        n_tokens = 256 + len(self._merges)
        return tiktoken.Encoding(
            name=self.name, pat_str=self._pattern,
            mergeable_ranks={self._id_bytes[i]: i for i in range(n_tokens)},
            special_tokens=dict(self._special), explicit_n_vocab=self.vocab_size)

    def _tiktoken_encoding(self):
        if self._tiktoken is None:
            try:
                self._tiktoken = self.to_tiktoken()
            except GlassmindError:
                self._tiktoken = False  # not installed: the pure-Python encoder does the work
            else:
                # The Rust regex's scratch pool favours the first thread that uses it: make that this one,
                # not a worker of the first batch (once measured ~25% slower in this thread otherwise).
                self._tiktoken.encode_ordinary(" ")
        return self._tiktoken or None

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
                f"specials={list(self._special)})")


def _check_specials(tokens: Sequence[str]) -> None:
    for t in tokens:
        if not isinstance(t, str) or not t:
            raise GlassmindError(f"special token {t!r} must be a non-empty string")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise _surrogate_error(t) from None
    if len(set(tokens)) != len(tokens):
        raise GlassmindError(f"special tokens repeat: {list(tokens)}")


def _split_pattern(pre_tokenizer: dict | None) -> str:
    """The regex of the Split pre-tokenizer in a tokenizer.json written by to_hf_json."""
    steps = []
    if pre_tokenizer:
        steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer.get("type") == "Sequence" \
            else [pre_tokenizer]
    for step in steps:
        if step.get("type") == "Split" and "Regex" in (step.get("pattern") or {}):
            return step["pattern"]["Regex"]
    raise GlassmindError("tokenizer.json has no Split pre-tokenizer with a regex: not a glassmind byte-level "
                         "BPE file")
