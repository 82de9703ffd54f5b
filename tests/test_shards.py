"""Token shards (layout, manifest, reuse, atomic build) and the window loader (packing, determinism, rank
slices, exact resume)."""

import json

import numpy as np
import pytest
import torch

from glassmind.common import GlassmindError
from glassmind.data import shards as sh
from glassmind.data.corpus import documents, split_of
from glassmind.data.loader import WindowLoader
from glassmind.tokenizer.bpe import BPETokenizer


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


TEXTS = [f"document {i}: " + "word " * (i % 7 + 1) + "é" * (i % 3) for i in range(200)]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # document ids ("data.jsonl:N") do not depend on the temp folder
    write_jsonl(tmp_path / "data.jsonl", TEXTS)
    return "data.jsonl"


@pytest.fixture(scope="module")
def byte_tok():
    return BPETokenizer([], special_tokens=["<|endoftext|>"])  # ids = bytes, 256 = <|endoftext|>


class CountingTokenizer:
    """Wraps a tokenizer, counting encode calls, optionally claiming a vocab too big for uint16."""

    def __init__(self, inner, vocab_size=None, fail_after=None):
        self.inner, self.calls, self.fail_after = inner, 0, fail_after
        self.vocab_size = vocab_size or inner.vocab_size
        self.special_tokens = inner.special_tokens

    def encode_batch(self, texts):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # a user pressing Ctrl-C mid-build
        return self.inner.encode_batch(texts)

    def fingerprint(self):
        return self.inner.fingerprint() + str(self.vocab_size)


def test_layout_manifest_and_stream(corpus, tmp_path, byte_tok):
    s = sh.build_shards(byte_tok, corpus, root=tmp_path / "shards", val_fraction=0.2, progress=False)
    m = s.manifest
    assert m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == byte_tok.fingerprint()
    assert m["tokenizer"]["separator"] == 256
    docs = list(documents(corpus))
    assert [d["id"] for d in m["documents"]] == [d.id for d in docs]
    for split in ("train", "val"):
        mine = [d for d in docs if split_of(d.id, 0.2) == split]
        assert mine, "both splits must be populated for this test to mean anything"
        expected = [t for d in mine for t in [256] + list(d.text.encode("utf-8"))]
        stream = s.split(split)
        assert len(stream) == s.tokens(split) == len(expected)
        assert stream.read(0, len(stream)).tolist() == expected
        assert m["splits"][split]["documents"] == len(mine)
        assert m["splits"][split]["bytes"] == sum(len(d.text.encode()) for d in mine)
    assert s.bytes_per_token("val") == pytest.approx(
        m["splits"]["val"]["bytes"] / m["splits"]["val"]["tokens"])


def test_many_shard_files_read_as_one_stream(corpus, tmp_path, byte_tok):
    one = sh.build_shards(byte_tok, corpus, root=tmp_path / "a", progress=False)
    many = sh.build_shards(byte_tok, corpus, root=tmp_path / "b", shard_tokens=100, progress=False)
    assert len(many.manifest["splits"]["train"]["files"]) > 10
    a, b = one.split("train"), many.split("train")
    assert len(a) == len(b)
    rng = np.random.default_rng(0)
    for _ in range(50):  # reads that cross file boundaries
        start = int(rng.integers(0, len(a) - 300))
        n = int(rng.integers(0, 300))
        assert np.array_equal(a.read(start, n), b.read(start, n))


def test_rerun_reuses_and_changed_content_rebuilds(corpus, tmp_path, byte_tok):
    tok = CountingTokenizer(byte_tok)
    root = tmp_path / "shards"
    first = sh.build_shards(tok, corpus, root=root, progress=False)
    calls = tok.calls
    assert calls > 0
    again = sh.build_shards(tok, corpus, root=root, progress=False)
    assert tok.calls == calls and again.path == first.path  # reused, not re-tokenized
    write_jsonl(tmp_path / "data.jsonl", TEXTS[:-1] + ["a changed last document"])
    changed = sh.build_shards(tok, corpus, root=root, progress=False)
    assert tok.calls > calls and changed.path == first.path
    assert changed.manifest["documents"][-1]["bytes"] == len("a changed last document")
    assert len(list(root.iterdir())) == 1  # no temporary or stale folder left behind


def test_uint32_when_the_vocab_does_not_fit_16_bits(corpus, tmp_path, byte_tok):
    s = sh.build_shards(CountingTokenizer(byte_tok, vocab_size=70000), corpus, root=tmp_path / "s", progress=False)
    assert s.manifest["dtype"] == "uint32"
    assert (s.path / s.manifest["splits"]["train"]["files"][0]).stat().st_size == 4 * s.tokens("train")
    assert sh.token_dtype(65536) == np.uint16 and sh.token_dtype(65537) == np.uint32


def test_interrupted_build_leaves_nothing_that_looks_finished(corpus, tmp_path, byte_tok):
    root = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        sh.build_shards(CountingTokenizer(byte_tok, fail_after=1), corpus, root=root, progress=False,
                        batch_docs=8)
    assert not root.exists() or list(root.iterdir()) == []


def test_wordpiece_documents_are_joined_by_sep(corpus, tmp_path):
    from glassmind.tokenizer.wordpiece import WordPieceTokenizer

    tok = WordPieceTokenizer.train(TEXTS, 50, progress=False)
    s = sh.build_shards(tok, corpus, root=tmp_path / "s", progress=False)
    sep = tok.special_tokens["[SEP]"]
    assert s.manifest["tokenizer"]["separator"] == sep
    stream = s.split("train").read(0, s.tokens("train"))
    assert (stream == sep).sum() == s.manifest["splits"]["train"]["documents"]
    assert stream[0] == sep


# ----------------------------------------------------------------------------------------------------
# the loader


def loader(n=1000, **kw):
    args = dict(window=9, stride=8, batch_size=4, seed=0)
    args.update(kw)
    return WindowLoader(np.arange(n), rank=args.pop("rank", 0), world_size=args.pop("world_size", 1), **args)


def test_packing_windows_share_one_token_and_cover_every_target_once_per_epoch():
    ld = loader()
    assert ld.n_windows == (1000 - 9) // 8 + 1
    seen = []
    for g in range(ld.batches_per_epoch):
        b = ld.batch(g)
        assert b.shape == (4, 9) and b.dtype == torch.int64
        assert torch.equal(b[:, 1:] - b[:, :-1], torch.ones(4, 8, dtype=torch.int64))  # contiguous windows
        assert (b[:, 0] % 8 == 0).all()
        seen += b[:, 0].tolist()
    assert len(seen) == len(set(seen)) == ld.batches_per_epoch * 4  # each window at most once per epoch


def test_order_is_seeded_and_changes_each_epoch():
    a, b, c = loader(seed=1), loader(seed=1), loader(seed=2)
    n = a.batches_per_epoch
    assert all(torch.equal(a.batch(g), b.batch(g)) for g in range(2 * n))
    assert not torch.equal(a.batch(0), c.batch(0))
    assert not torch.equal(a.batch(0), a.batch(n))  # epoch 2 is reshuffled
    unshuffled = loader(shuffle=False)
    assert unshuffled.batch(0)[:, 0].tolist() == [0, 8, 16, 24]


def test_ranks_take_interleaved_batches_of_the_single_process_sequence():
    single = loader()
    expected = [single.next()[1] for _ in range(12)]
    ranks = [loader(rank=r, world_size=3) for r in range(3)]
    got = [None] * 12
    for step in range(4):
        for r, ld in enumerate(ranks):
            g, b = ld.next()
            assert g == step * 3 + r
            got[g] = b
    assert all(torch.equal(x, y) for x, y in zip(expected, got))


def test_resume_gives_the_very_next_batch_never_replays_or_skips():
    reference = loader()
    ref = [reference.next() for _ in range(2 * reference.batches_per_epoch + 5)]  # crosses epochs
    for cut in (0, 1, 7, reference.batches_per_epoch, len(ref) - 1):
        first = loader()
        taken = [first.next() for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))  # it travels through state.json
        resumed = loader()
        resumed.load_state_dict(state)
        taken += [resumed.next() for _ in range(len(ref) - cut)]
        assert [g for g, _ in taken] == list(range(len(ref)))
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(taken, ref))


def test_resume_on_another_world_size_keeps_the_global_position():
    one = loader()
    for _ in range(6):
        one.next()
    two = loader(rank=1, world_size=2)
    two.load_state_dict(one.state_dict())
    assert two.next()[0] == 7
    bad = loader(rank=0, world_size=4)
    with pytest.raises(GlassmindError, match="world size"):
        bad.load_state_dict(one.state_dict())


def test_resume_into_a_different_loader_is_refused():
    state = loader().state_dict()
    with pytest.raises(GlassmindError, match="batch_size"):
        loader(batch_size=2).load_state_dict(state)
    with pytest.raises(GlassmindError, match="seed"):
        loader(seed=5).load_state_dict(state)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(GlassmindError, match="too few"):
        loader(n=20)
