"""WordPiece (BERT's tokenizer): likelihood-driven vocabulary training and greedy longest-match encoding.

Text -> BERT normalisation -> words (whitespace/punctuation split, see normalize.py) -> each word is cut
greedily into the longest vocabulary piece that starts where the previous one ended; pieces after the
first carry the `##` continuation prefix. A word with a piece missing from the vocabulary, or longer than
`max_input_chars_per_word` characters, becomes a single [UNK] (Wu et al. 2016, "Google's Neural Machine
Translation System", section 4.1; Devlin et al. 2018, BERT, section 3).

Training (Schuster & Nakajima 2012, "Japanese and Korean voice search"): start from every character
seen (first characters of a word plain, the others with `##`) and repeatedly merge the adjacent pair
that most increases the likelihood of the training words under a unigram model of pieces. Merging a and b
raises the log-likelihood by roughly count(ab) * log(N * count(ab) / (count(a) * count(b))), a
frequency-weighted pointwise mutual information; the usual criterion (Hugging Face's course, and ours)
ranks pairs by the unweighted ratio

    score(a, b) = count(ab) / (count(a) * count(b))

so a pair wins when its parts rarely occur apart, not because it is frequent (that is BPE's rule). The
ratio alone overrates rare pairs; `min_frequency` keeps them out (see `train`).

Files: `tokenizer.json` in Hugging Face tokenizers' format (BertNormalizer, BertPreTokenizer, WordPiece
model and decoder, [CLS]/[SEP] template), or a BERT `vocab.txt` (one piece per line, line number = id).
"""

from __future__ import annotations

import heapq
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from glassmind.common import GlassmindError
from glassmind.tokenizer.base import Tokenizer
from glassmind.tokenizer.normalize import words as split_words

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PREFIX = "##"


class WordPieceTokenizer(Tokenizer):
    """A WordPiece vocabulary plus the BERT normalisation options it was built with."""

    kind = "wordpiece"

    def __init__(self, vocab: dict[str, int], *, special_tokens: Iterable[str] = BERT_SPECIAL_TOKENS,
                 unk_token: str = "[UNK]", cls_token: str | None = "[CLS]", sep_token: str | None = "[SEP]",
                 lowercase: bool = True, strip_accents: bool | None = None, clean_text: bool = True,
                 handle_chinese_chars: bool = True, max_input_chars_per_word: int = 100,
                 continuing_subword_prefix: str = PREFIX, decoder_cleanup: bool = True):
        self.vocab = dict(vocab)
        self.inverse = {i: t for t, i in self.vocab.items()}
        specials = [t for t in special_tokens if t in self.vocab]
        if unk_token not in self.vocab:
            raise GlassmindError(f"the vocabulary has no unknown token {unk_token!r}: add it (BERT puts "
                                 "[UNK] on line 101 of vocab.txt) or pass unk_token=")
        if unk_token not in specials:
            specials.append(unk_token)
        self._special = {t: self.vocab[t] for t in specials}
        self.unk_token, self.unk_id = unk_token, self.vocab[unk_token]
        self.cls_token = cls_token if cls_token in self.vocab else None
        self.sep_token = sep_token if sep_token in self.vocab else None
        self.lowercase, self.strip_accents = lowercase, strip_accents
        self.clean_text, self.handle_chinese_chars = clean_text, handle_chinese_chars
        self.max_input_chars_per_word = max_input_chars_per_word
        self.prefix = continuing_subword_prefix
        self.decoder_cleanup = decoder_cleanup
        # no piece is longer than the longest vocabulary entry, so longest-match need not try more
        self._max_piece = max(map(len, self.vocab), default=1)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._special_re: dict[frozenset, re.Pattern] = {}

    @classmethod
    def of_words(cls, words: Sequence[str]) -> "WordPieceTokenizer":
        """A tokenizer whose every token is one whole word of `words` (ids in that order; "[UNK]" must be
        among them), case kept, no [CLS]/[SEP]: the vocabulary of a synthetic task (the induction study, the
        position eval), so its models' ids decode to readable words."""
        return cls({w: i for i, w in enumerate(words)}, special_tokens=["[UNK]"], cls_token=None, sep_token=None,
                   lowercase=False)

    # -- training -----------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, lowercase: bool = True,
              strip_accents: bool | None = None, min_frequency: int | None = None,
              max_input_chars_per_word: int = 100, special_tokens: Sequence[str] = BERT_SPECIAL_TOKENS,
              progress: bool = True) -> "WordPieceTokenizer":
        """Learn a vocabulary of `vocab_size` pieces from `texts` with the likelihood criterion.

        A pair is merged only if it occurs at least `min_frequency` times. The likelihood score favours
        rare pairs: a pair seen once whose parts occur nowhere else scores the maximum, 1.0, so with no
        floor the budget goes to one-off strings (on the standard library at vocab 8192 with a floor of 2,
        "self" and "return" stay spelled letter by letter). The default, None, sets the floor to one
        occurrence per 100,000 words of training text (at least 2); pass an int to choose it.

        Ties in score go to the more frequent pair, then to the lexicographically smaller (first, second)
        strings, so training is deterministic. If no pair reaches the floor before `vocab_size`, the
        vocabulary comes out smaller (a warning says so).
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        if "[UNK]" not in special_tokens:
            special_tokens.insert(0, "[UNK]")
        if vocab_size <= len(special_tokens):
            raise GlassmindError(f"vocab_size {vocab_size} leaves no room beside {len(special_tokens)} special "
                                 f"tokens: use a vocab size of at least a few hundred")
        if min_frequency is not None and min_frequency < 1:
            raise GlassmindError(f"min_frequency must be >= 1, got {min_frequency}")
        counts = count_words(texts, lowercase=lowercase, strip_accents=strip_accents,
                             max_input_chars_per_word=max_input_chars_per_word, progress=progress)
        if not counts:
            raise GlassmindError("no words to train on: the texts are empty (or hold only whitespace and "
                                 "control characters); pass a corpus with some text")
        if min_frequency is None:
            min_frequency = max(2, sum(counts.values()) // 100_000)
        budget = vocab_size - len(special_tokens)
        alphabet, pieces = learn_pieces(counts, budget, min_frequency=min_frequency,
                                        reserved=len(special_tokens), progress=progress)
        if len(alphabet) + len(pieces) < budget:
            warnings.warn(f"no pair occurs min_frequency={min_frequency} times after {len(pieces)} merges: "
                          f"vocab_size is {len(special_tokens) + len(alphabet) + len(pieces)}, not {vocab_size} "
                          "(lower min_frequency for more)", stacklevel=2)
        tokens = special_tokens + [t for t in alphabet + pieces if t not in special_tokens]
        return cls({t: i for i, t in enumerate(tokens)}, special_tokens=special_tokens, lowercase=lowercase,
                   strip_accents=strip_accents, max_input_chars_per_word=max_input_chars_per_word)

    # -- encoding -----------------------------------------------------------------------------------------
    def encode(self, text: str, *, allowed_special: str | Iterable[str] = (),
               add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. `add_special_tokens=True` wraps them in [CLS] ... [SEP], as BertTokenizerFast does
        by default. Text spelling a special token ("[MASK]") is ordinary text unless allowed."""
        ids: list[int] = []
        for segment, special_id in self._split_specials(text, allowed_special):
            if special_id is not None:
                ids.append(special_id)
            else:
                ids.extend(self._encode_ordinary(segment))
        if add_special_tokens:
            ids = self._wrap(ids)
        return ids

    def encode_pair(self, a: str, b: str, *, allowed_special: str | Iterable[str] = ()) -> tuple[list[int], list[int]]:
        """A sentence pair as BERT sees it: ([CLS] a [SEP] b [SEP], token type ids 0 for a's part, 1 for b's)."""
        ids_a = self._wrap(self.encode(a, allowed_special=allowed_special))
        ids_b = self.encode(b, allowed_special=allowed_special)
        if self.sep_token is not None:
            ids_b.append(self.vocab[self.sep_token])
        return ids_a + ids_b, [0] * len(ids_a) + [1] * len(ids_b)

    def _wrap(self, ids: list[int]) -> list[int]:
        head = [self.vocab[self.cls_token]] if self.cls_token is not None else []
        tail = [self.vocab[self.sep_token]] if self.sep_token is not None else []
        return head + ids + tail

    def _split_specials(self, text: str, allowed_special: str | Iterable[str]):
        """Yield (segment, None) for ordinary text and ("", id) for each allowed special token, in order.

        Specials are matched in the raw text before normalisation, leftmost then longest, as tokenizers
        does for added tokens with normalized=False."""
        if isinstance(allowed_special, str):  # "all", or one token named on its own
            allowed_special = self._special if allowed_special == "all" else (allowed_special,)
        allowed = frozenset(allowed_special)
        if not allowed:
            yield text, None
            return
        unknown = allowed - self._special.keys()
        if unknown:
            raise GlassmindError(f"not special tokens of this tokenizer: {sorted(unknown)}; "
                                 f"its special tokens are {sorted(self._special)}")
        pattern = self._special_re.get(allowed)
        if pattern is None:
            pattern = re.compile("|".join(map(re.escape, sorted(allowed, key=len, reverse=True))))
            self._special_re[allowed] = pattern
        start = 0
        for m in pattern.finditer(text):
            yield text[start:m.start()], None
            yield "", self._special[m.group()]
            start = m.end()
        yield text[start:], None

    def _encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        ids: list[int] = []
        cache = self._cache
        for word in split_words(text, lowercase=self.lowercase, strip_accents=self.strip_accents,
                                clean_text=self.clean_text, handle_chinese_chars=self.handle_chinese_chars):
            pieces = cache.get(word)
            if pieces is None:
                pieces = self._segment(word)
                if len(cache) >= 200_000:  # bound memory on endless streams of new words
                    cache.clear()
                cache[word] = pieces
            ids.extend(pieces)
        return ids

    def _segment(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first; the whole word is [UNK] if any position has no piece."""
        n = len(word)
        if n > self.max_input_chars_per_word:
            return (self.unk_id,)
        vocab, prefix, ids, start = self.vocab, self.prefix, [], 0
        while start < n:
            end = min(n, start + self._max_piece)
            while end > start:
                piece = word[start:end] if start == 0 else prefix + word[start:end]
                i = vocab.get(piece)
                if i is not None:
                    break
                end -= 1
            else:
                return (self.unk_id,)
            ids.append(i)
            start = end
        return tuple(ids)

    def tokenize(self, text: str) -> list[str]:
        """The pieces as strings (no special tokens), e.g. ["token", "##izer"]."""
        return [self.inverse[i] for i in self.encode(text)]

    # -- decoding -----------------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Pieces joined as tokenizers' WordPiece decoder does: a `##` piece glues onto the one before,
        any other piece gets a space; with cleanup, spaces before . , ! ? and in English contractions go.
        Special tokens ([UNK] included) are dropped unless skip_special_tokens=False. Normalisation is
        lossy (case, accents, spacing), so decode(encode(s)) is s only for normalised text."""
        special_ids = set(self._special.values()) if skip_special_tokens else set()
        tokens = [self.inverse[i] for i in ids if i in self.inverse and i not in special_ids]
        out = []
        for k, token in enumerate(tokens):
            if k:
                token = token[len(self.prefix):] if token.startswith(self.prefix) else " " + token
            if self.decoder_cleanup:
                token = _cleanup(token)
            out.append(token)
        return "".join(out)

    # -- vocabulary ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, i: int) -> str:
        try:
            return self.inverse[i]
        except KeyError:
            raise GlassmindError(f"token id {i} is not in this tokenizer (it has {len(self.inverse)} ids)") from None

    # -- files --------------------------------------------------------------------------------------------
    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike, lowercase: bool = True,
                        strip_accents: bool | None = None, **kwargs) -> "WordPieceTokenizer":
        """A BERT `vocab.txt`: one piece per line, the line number is its id. Trailing whitespace is
        trimmed from each line, as tokenizers' WordPiece.read_file does; a repeated line keeps its last id."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except OSError as e:
            raise GlassmindError(f"cannot read vocabulary file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise GlassmindError(f"{path} is not UTF-8 text: a BERT vocab.txt has one UTF-8 piece per line") from None
        if lines and lines[-1] == "":
            lines.pop()
        vocab = {line.rstrip(): i for i, line in enumerate(lines)}
        return cls(vocab, lowercase=lowercase, strip_accents=strip_accents, **kwargs)

    def save_vocab(self, path: str | os.PathLike) -> Path:
        """Write a BERT `vocab.txt` (ids must be 0..n-1 without gaps)."""
        from glassmind.common import atomic_write_text

        if sorted(self.inverse) != list(range(len(self.inverse))):
            raise GlassmindError("this vocabulary's ids have gaps, which vocab.txt cannot express; save() it "
                                 "as tokenizer.json instead")
        return atomic_write_text(path, "".join(self.inverse[i] + "\n" for i in range(len(self.inverse))))

    def to_hf_json(self) -> dict:
        def special(token):
            return {"SpecialToken": {"id": token, "type_id": 0}}

        cls_, sep = self.cls_token, self.sep_token
        post = None
        if cls_ is not None and sep is not None:
            post = {
                "type": "TemplateProcessing",
                "single": [special(cls_), {"Sequence": {"id": "A", "type_id": 0}}, special(sep)],
                "pair": [special(cls_), {"Sequence": {"id": "A", "type_id": 0}}, special(sep),
                         {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": sep, "type_id": 1}}],
                "special_tokens": {t: {"id": t, "ids": [self.vocab[t]], "tokens": [t]} for t in (cls_, sep)},
            }
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for t, i in sorted(self._special.items(), key=lambda kv: kv[1])
            ],
            "normalizer": {"type": "BertNormalizer", "clean_text": self.clean_text,
                           "handle_chinese_chars": self.handle_chinese_chars,
                           "strip_accents": self.strip_accents, "lowercase": self.lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": post,
            "decoder": {"type": "WordPiece", "prefix": self.prefix, "cleanup": self.decoder_cleanup},
            "model": {"type": "WordPiece", "unk_token": self.unk_token,
                      "continuing_subword_prefix": self.prefix,
                      "max_input_chars_per_word": self.max_input_chars_per_word,
                      "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))},
        }

    @classmethod
    def from_hf_json(cls, doc: dict) -> "WordPieceTokenizer":
        """Read a tokenizers `tokenizer.json` whose model is WordPiece with BERT's normaliser and
        pre-tokenizer. Truncation and padding settings (batch policies) are ignored."""
        model = doc.get("model") or {}
        if model.get("type") != "WordPiece":
            raise GlassmindError(f"tokenizer.json model type is {model.get('type')!r}, not WordPiece")
        norm = doc.get("normalizer")
        if norm is None:
            norm = {"clean_text": False, "handle_chinese_chars": False, "strip_accents": False, "lowercase": False}
        elif norm.get("type") != "BertNormalizer":
            raise GlassmindError(f"tokenizer.json normalizer {norm.get('type')!r} is not supported: glassmind's "
                                 "WordPiece reads BertNormalizer (or none)")
        pre = (doc.get("pre_tokenizer") or {}).get("type")
        if pre != "BertPreTokenizer":
            raise GlassmindError(f"tokenizer.json pre_tokenizer {pre!r} is not supported: glassmind's WordPiece "
                                 "reads BertPreTokenizer")
        added = doc.get("added_tokens") or []
        plain = [t["content"] for t in added if not t.get("special")]
        if plain:
            raise GlassmindError(f"tokenizer.json has non-special added tokens {plain[:5]}, which glassmind's "
                                 "WordPiece does not support: add them to the model vocab instead")
        vocab = dict(model["vocab"])
        for t in added:
            vocab.setdefault(t["content"], t["id"])
        cls_token, sep_token = _template_cls_sep(doc.get("post_processor"))
        decoder = doc.get("decoder") or {}
        return cls(vocab, special_tokens=[t["content"] for t in added], unk_token=model.get("unk_token", "[UNK]"),
                   cls_token=cls_token, sep_token=sep_token, lowercase=bool(norm.get("lowercase", True)),
                   strip_accents=norm.get("strip_accents"), clean_text=bool(norm.get("clean_text", True)),
                   handle_chinese_chars=bool(norm.get("handle_chinese_chars", True)),
                   max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
                   continuing_subword_prefix=model.get("continuing_subword_prefix", PREFIX),
                   decoder_cleanup=bool(decoder.get("cleanup", True)))


def _cleanup(token: str) -> str:
    """tokenizers' decoders::wordpiece::cleanup, applied to each piece after its space is added."""
    for dirty, clean in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        token = token.replace(dirty, clean)
    return token


def _template_cls_sep(post: dict | None) -> tuple[str | None, str | None]:
    """[CLS] and [SEP] from a TemplateProcessing or BertProcessing post-processor (None when absent)."""
    if not post:
        return None, None
    if post.get("type") == "BertProcessing":
        return post["cls"][0], post["sep"][0]
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or [{}]
        head = single[0].get("SpecialToken", {}).get("id")
        tail = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
        return head, tail
    raise GlassmindError(f"tokenizer.json post_processor {post.get('type')!r} is not supported: glassmind's "
                         "WordPiece reads TemplateProcessing or BertProcessing")


# ---------------------------------------------------------------------------------------------------------
# training


def count_words(texts: Iterable[str], *, lowercase: bool = True, strip_accents: bool | None = None,
                max_input_chars_per_word: int = 100, progress: bool = False) -> Counter:
    """Normalise and pre-tokenize every text; count each distinct word once. Words longer than
    `max_input_chars_per_word` are left out: encoding turns them into [UNK] whole."""
    from tqdm import tqdm

    counts: Counter = Counter()
    for text in tqdm(texts, desc="counting words", unit=" texts", disable=not progress):
        counts.update(split_words(text, lowercase=lowercase, strip_accents=strip_accents))
    for word in [w for w in counts if len(w) > max_input_chars_per_word]:
        del counts[word]
    return counts


def learn_pieces(word_counts: dict[str, int], budget: int, *, min_frequency: int = 2, reserved: int = 0,
                 progress: bool = False) -> tuple[list[str], list[str]]:
    """(alphabet, merged pieces in merge order), at most `budget` together (`reserved`: how many special
    tokens the caller adds, for the error message).

    The state is every distinct word as a list of symbol ids, the count of each adjacent pair (weighted by
    word frequency), for each pair the words that contain it, and for each symbol the pairs it is part of.
    A merge of (a, b) rewrites only the words containing that pair and adjusts the counts of the pairs they
    gain or lose. Scores live in a max-heap with lazy deletion: an entry is checked against the current
    counts when it reaches the top. Merging lowers count(a) and count(b), which raises the score of every
    other pair containing a or b, so those pairs get fresh entries; all other scores can only fall, and a
    falling score is caught by the check at the top.
    """
    from tqdm import tqdm

    plain = sorted({w[0] for w in word_counts})
    cont = sorted({PREFIX + c for w in word_counts for c in w[1:]})
    alphabet = plain + cont
    if len(alphabet) > budget:
        raise GlassmindError(f"vocab size too small for this corpus: its alphabet alone is {len(alphabet)} pieces "
                             f"({len(plain)} word-initial characters, {len(cont)} continuations) and "
                             f"{reserved} special tokens; use a vocab size well above {len(alphabet) + reserved}")
    sym: list[str] = list(alphabet)
    sym_id = {s: i for i, s in enumerate(sym)}
    tok_count = [0] * len(sym)

    # pairs are one int, a * K + b: dict lookups on ints are much cheaper than on tuples
    K = 1 << 24
    words: list[list[int]] = []
    freqs: list[int] = []
    pair_count: dict[int, int] = {}
    where: dict[int, set[int]] = {}
    for w, f in word_counts.items():
        syms = [sym_id[w[0]]] + [sym_id[PREFIX + c] for c in w[1:]]
        for s in syms:
            tok_count[s] += f
        if len(syms) < 2:
            continue
        wi = len(words)
        words.append(syms)
        freqs.append(f)
        for x, y in zip(syms, syms[1:]):
            k = x * K + y
            pair_count[k] = pair_count.get(k, 0) + f
            where.setdefault(k, set()).add(wi)
    # only pairs at or above min_frequency: a rarer pair can become eligible only by growing, and pairs
    # that grow get fresh heap entries anyway
    pairs_of: dict[int, set[int]] = {}
    for k, cnt in pair_count.items():
        if cnt >= min_frequency:
            x, y = divmod(k, K)
            pairs_of.setdefault(x, set()).add(k)
            pairs_of.setdefault(y, set()).add(k)

    def entry(k: int, c: int):
        x, y = divmod(k, K)
        return (-c / (tok_count[x] * tok_count[y]), -c, sym[x], sym[y], k)

    heap = [entry(k, c) for k, c in pair_count.items() if c >= min_frequency]
    heapq.heapify(heap)

    pieces: list[str] = []
    n_new = budget - len(alphabet)
    bar = tqdm(total=n_new, desc="merging pieces", unit=" pieces", disable=not progress)
    while len(alphabet) + len(pieces) < budget:
        best = _pop_best(heap, pair_count, entry, min_frequency)
        if best is None:
            break  # no pair left that occurs min_frequency times
        a, b = divmod(best, K)
        merged = sym[a] + sym[b][len(PREFIX):]  # b is never word-initial, so it always has the prefix
        c = sym_id.get(merged)
        if c is None:  # the same string can arise from different pairs; keep one symbol for it
            c = sym_id[merged] = len(sym)
            sym.append(merged)
            tok_count.append(0)
            pieces.append(merged)
            bar.update(1)
        n, grown = _apply_merge(best, a, b, c, K, words, freqs, pair_count, where, pairs_of, min_frequency)
        tok_count[a] -= n
        tok_count[b] -= n
        tok_count[c] += n
        # pairs that grew (all hold c) score higher; so does every pair holding a or b, whose counts fell
        for k in grown | pairs_of.get(a, set()) | pairs_of.get(b, set()):
            x, y = divmod(k, K)  # entry(k, count), inlined: this loop makes most of the heap pushes
            cnt = pair_count[k]
            heapq.heappush(heap, (-cnt / (tok_count[x] * tok_count[y]), -cnt, sym[x], sym[y], k))
        if len(heap) > 4 * len(pair_count) + 100_000:  # drop stale entries before they pile up
            heap = [entry(k, cnt) for k, cnt in pair_count.items() if cnt >= min_frequency]
            heapq.heapify(heap)
    bar.close()
    return alphabet, pieces


def _pop_best(heap, pair_count, entry, min_frequency) -> int | None:
    """Pop until the top entry matches the pair's current score and count; return that pair."""
    while heap:
        top = heapq.heappop(heap)
        k = top[4]
        c = pair_count.get(k, 0)
        if c < min_frequency:
            continue
        fresh = entry(k, c)
        if fresh[:2] == top[:2]:
            return k
        heapq.heappush(heap, fresh)
    return None


def _apply_merge(pair, a, b, c, K, words, freqs, pair_count, where, pairs_of, min_frequency) -> tuple[int, set[int]]:
    """Replace a, b with c in every word that has the pair; update pair counts and indexes. Returns the
    number of merges made (weighted by word frequency) and the eligible pairs (>= min_frequency) whose
    count grew.

    Only the pairs next to each merge change: (prev, a) -> (prev, c), (a, b) goes, (b, next) -> (c, next),
    where prev is already rewritten when merges are adjacent ("a b a b" -> "c c"), as in tokenizers'
    Word::merge. `where` may keep a word for a pair it has lost; such a word is skipped when found there.
    """
    delta: dict[int, int] = {}
    total = 0
    for wi in where.pop(pair, ()):
        syms, f = words[wi], freqs[wi]
        out: list[int] = []
        i, n, L = 0, 0, len(syms)
        while i < L:
            if syms[i] == a and i + 1 < L and syms[i + 1] == b:
                if out:
                    prev = out[-1]
                    delta[prev * K + a] = delta.get(prev * K + a, 0) - f
                    delta[prev * K + c] = delta.get(prev * K + c, 0) + f
                if i + 2 < L:
                    nxt = syms[i + 2]
                    delta[b * K + nxt] = delta.get(b * K + nxt, 0) - f
                    delta[c * K + nxt] = delta.get(c * K + nxt, 0) + f
                out.append(c)
                i += 2
                n += 1
            else:
                out.append(syms[i])
                i += 1
        if not n:
            continue
        total += n * f
        delta[pair] = delta.get(pair, 0) - n * f
        for x, y in zip(out, out[1:]):
            if x == c or y == c:
                where.setdefault(x * K + y, set()).add(wi)
        words[wi] = out
    grown: set[int] = set()
    for k, d in delta.items():
        if not d:
            continue
        before = pair_count.get(k, 0)
        after = before + d
        if after:
            pair_count[k] = after
        else:
            del pair_count[k]
            where.pop(k, None)
        if (before >= min_frequency) != (after >= min_frequency):  # crossed the floor: pairs_of follows
            x, y = divmod(k, K)
            if after >= min_frequency:
                pairs_of.setdefault(x, set()).add(k)
                pairs_of.setdefault(y, set()).add(k)
            else:
                pairs_of[x].discard(k)
                pairs_of[y].discard(k)
        if d > 0 and after >= min_frequency:
            grown.add(k)
    return total, grown
