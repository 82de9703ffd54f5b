"""The corpus: built-in text from the Python installation, files, globs, JSONL, local HF datasets; the split."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from glassmind.common import GlassmindError
from glassmind.data import corpus
from glassmind.data.corpus import CorpusStats, Document, describe, documents, split_of, texts

# ------------------------------------------------------------------------------------------------------
# built-in corpus


def test_builtin_corpus_is_stdlib_then_pydoc_topics():
    from pydoc_data.topics import topics

    stats = CorpusStats()
    docs = list(documents(stats=stats))
    ids = [d.id for d in docs]
    n_stdlib = sum(i.startswith("stdlib/") for i in ids)
    assert ids[:n_stdlib] == sorted(ids[:n_stdlib], key=lambda i: i)  # stdlib first, sorted by path
    assert ids[n_stdlib:] == [f"pydoc/{k}" for k in sorted(topics) if topics[k]]
    assert not any("site-packages" in i for i in ids)
    assert "stdlib/json/decoder.py" in ids and n_stdlib > 500
    assert stats.documents == len(docs) and stats.bytes > 10_000_000
    assert len(set(ids)) == len(ids)
    # deterministic: a second pass gives the same documents
    assert [d.id for d in itertools.islice(documents(), 50)] == ids[:50]


def test_builtin_corpus_decodes_coding_cookies_and_skips_undecodable():
    root = corpus.stdlib_root()
    koi8 = root / "test" / "encoded_modules" / "module_koi8_r.py"
    bad = root / "test" / "tokenizedata" / "badsyntax_pep3120.py"
    if not koi8.exists() or not bad.exists():
        pytest.skip("this Python was installed without its test suite (the non-UTF-8 files live there)")
    stats = CorpusStats()
    by_id = {d.id: d for d in documents(stats=stats)}
    assert "Познание бесконечности" in by_id["stdlib/test/encoded_modules/module_koi8_r.py"].text  # decoded as koi8-r
    assert "stdlib/test/tokenizedata/badsyntax_pep3120.py" not in by_id
    assert "stdlib/test/tokenizedata/badsyntax_pep3120.py" in [where for where, _ in stats.skipped]


def test_read_text_decoding_rules(tmp_path):
    (tmp_path / "utf8.py").write_bytes("\ufeffx = 'é'\n".encode("utf-8"))  # BOM dropped
    (tmp_path / "latin1.py").write_bytes("# -*- coding: latin-1 -*-\nx = 'é'\n".encode("latin-1"))
    (tmp_path / "koi8.py").write_bytes("# vim: set fileencoding=koi8-r :\nx = 'Привет'\n".encode("koi8-r"))
    (tmp_path / "bad.py").write_bytes(b"x = '\xff\xfe'\n")  # not UTF-8, no cookie
    (tmp_path / "liar.py").write_bytes(b"# coding: ascii\nx = '\xe9'\n")  # cookie that does not decode
    assert corpus.read_text(tmp_path / "utf8.py") == "x = 'é'\n"
    assert corpus.read_text(tmp_path / "latin1.py").endswith("x = 'é'\n")
    assert "Привет" in corpus.read_text(tmp_path / "koi8.py")
    with pytest.raises(GlassmindError, match="not UTF-8.*no coding cookie"):
        corpus.read_text(tmp_path / "bad.py")
    with pytest.raises(GlassmindError, match="declared encoding 'ascii'"):
        corpus.read_text(tmp_path / "liar.py")
    # in a folder the undecodable files are skipped and counted; named on its own, one is an error
    stats = CorpusStats()
    assert [d.id for d in documents(str(tmp_path), stats=stats)] == ["koi8.py", "latin1.py", "utf8.py"]
    assert sorted(Path(p).name for p, _ in stats.skipped) == ["bad.py", "liar.py"]
    with pytest.raises(GlassmindError, match="bad.py is not UTF-8"):
        list(documents(str(tmp_path / "bad.py")))


# ------------------------------------------------------------------------------------------------------
# user sources


def test_files_directories_and_globs(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.md").write_text("ay", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / ".hidden").write_text("no", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("no", encoding="utf-8")
    d = str(tmp_path)
    assert [x.text for x in documents(d)] == ["ay", "bee", "sea"]  # sorted, hidden and empty left out
    assert [x.text for x in documents(f"{d}/**/*.txt")] == ["bee", "sea"]
    assert [x.text for x in documents([f"{d}/sub/c.txt", f"{d}/a.md"])] == ["sea", "ay"]  # sources in order
    assert list(documents(Path(d) / "b.txt")) == [Document("b.txt", "bee")]
    # ids: relative to the folder or the glob's root, so they do not depend on where the data lives
    assert [x.id for x in documents(d)] == ["a.md", "b.txt", "sub/c.txt"]
    assert [x.id for x in documents(f"{d}/**/*.txt")] == ["b.txt", "sub/c.txt"]
    assert [x.id for x in documents(f"{d}/s*/*.txt")] == ["sub/c.txt"]


def test_the_split_does_not_depend_on_where_the_data_lives(tmp_path):
    """The same files (a folder, a glob, a JSONL) copied to another place split into the same train and
    validation documents: the split hashes ids that hold no absolute path (an absolute path would tie a
    run's validation set, and the tokenizer trained on its train split, to the directory it ran in)."""
    import shutil

    from glassmind.data.corpus import texts

    a = tmp_path / "a" / "data"
    a.mkdir(parents=True)
    for i in range(60):
        (a / f"{i:02d}.txt").write_text(f"document {i}", encoding="utf-8")
    (a / "rows.jsonl").write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(60)), encoding="utf-8")
    b = tmp_path / "elsewhere" / "deeper" / "data"
    shutil.copytree(a, b)
    for src in ("{}", "{}/*.txt", "{}/rows.jsonl"):
        for split in ("train", "val"):
            here, there = (list(texts(src.format(root), split=split, val_fraction=0.3)) for root in (a, b))
            assert here == there and here, (src, split)


def test_jsonl_sources(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "one", "body": "uno"}\n\n{"text": "two", "body": "dos"}\n', encoding="utf-8")
    assert [(d.id, d.text) for d in documents(str(p))] == [("data.jsonl:1", "one"), ("data.jsonl:3", "two")]
    assert [d.text for d in documents(f"{p}:body")] == ["uno", "dos"]
    with pytest.raises(GlassmindError, match=r"data.jsonl:1 has no field 'title'.*data.jsonl:FIELD"):
        list(documents(f"{p}:title"))
    p.write_text('{"text": "one"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(GlassmindError, match=r"data.jsonl:2: field 'text' is int, not text"):
        list(documents(str(p)))
    p.write_text('{"text": "one"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(GlassmindError, match=r"data.jsonl:2 is not valid JSON"):
        list(documents(str(p)))


def test_bad_sources_fail_at_the_call_with_the_fix(tmp_path):
    with pytest.raises(GlassmindError, match="no such file or directory: .*nope.txt; pass a file, a directory"):
        documents(str(tmp_path / "nope.txt"))  # no iteration needed
    with pytest.raises(GlassmindError, match="no such file or directory"):
        texts([str(tmp_path / "nope.txt")])
    with pytest.raises(GlassmindError, match="matches no files"):
        documents(str(tmp_path / "*.txt"))
    with pytest.raises(GlassmindError, match="no such JSONL file"):
        documents(str(tmp_path / "x.jsonl:body"))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(GlassmindError, match="corpus is empty"):
        list(documents(str(tmp_path / "empty.txt")))
    with pytest.raises(GlassmindError, match="bad dataset source"):
        documents("hf:")


def test_hf_dataset_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(GlassmindError, match="pip install datasets"):
        documents("hf:wikitext")


def test_hf_dataset_from_disk_and_cache(monkeypatch, tmp_path):
    # a stand-in for the `datasets` package: load_from_disk returns a DatasetDict-like dict of splits
    class FakeDataset(list):
        column_names = ["text", "label"]

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda name: calls.append(("disk", name, os.environ.get("HF_DATASETS_OFFLINE"))) or {
        "train": FakeDataset([{"text": "hello", "label": 1}, {"text": "world", "label": 0}]),
        "test": FakeDataset([{"text": "held out", "label": 1}])}
    fake.load_dataset = lambda name, split: calls.append(("cache", name, split)) or FakeDataset([{"text": "x"}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    d = str(tmp_path)
    name = tmp_path.name  # a saved folder is named by its own name in ids, not by where it lives
    assert [(x.id, x.text) for x in documents(f"hf:{d}")] == [(f"hf:{name}:train:0", "hello"),
                                                               (f"hf:{name}:train:1", "world")]
    assert [x.text for x in documents(f"hf:{d}:test")] == ["held out"]
    assert calls[0] == ("disk", d, "1")  # loaded offline
    assert [x.text for x in documents("hf:some/name:validation")] == ["x"]
    assert calls[-1] == ("cache", "some/name", "validation")
    with pytest.raises(GlassmindError, match=r"no split 'dev' \(it has \['test', 'train'\]\)"):
        documents(f"hf:{d}:dev")
    with pytest.raises(GlassmindError, match=r"no column 'body'.*hf:.*:train:FIELD"):
        documents(f"hf:{d}:train:body")
    with pytest.raises(GlassmindError, match=r"field 'label' is int, not text"):
        list(documents(f"hf:{d}:train:label"))

    def unavailable(name, split):
        raise FileNotFoundError(f"Couldn't find a dataset script at {name}")

    fake.load_dataset = unavailable
    with pytest.raises(GlassmindError, match="from local files.*save_to_disk"):
        documents("hf:not/cached")


# ------------------------------------------------------------------------------------------------------
# split and texts


def test_split_is_a_hash_of_the_id():
    ids = [f"doc-{i}" for i in range(20000)]
    splits = [split_of(i) for i in ids]
    assert 0.007 < splits.count("val") / len(ids) < 0.013
    for i in ids[:200]:  # the documented rule: the first 8 bytes of sha1(id) as a fraction of 2**64
        u = int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "big") / 2**64
        assert split_of(i) == ("val" if u < 0.01 else "train")
    assert {split_of(i, 0.0) for i in ids[:100]} == {"train"}
    assert {split_of(i, 1.0) for i in ids[:100]} == {"val"}
    assert [split_of(i, 0.5) for i in ids[:100]].count("val") in range(30, 71)
    with pytest.raises(GlassmindError, match="between 0 and 1"):
        split_of("x", 1.5)


def test_split_does_not_depend_on_the_process():
    # Python's hash() of a str is salted per process; split_of must not be. The child stubs
    # glassmind.common (corpus needs only GlassmindError from it) to skip importing torch.
    code = ("import sys, types; common = types.ModuleType('glassmind.common'); common.GlassmindError = Exception; "
            "sys.modules['glassmind.common'] = common; from glassmind.data.corpus import split_of; "
            "print(''.join(split_of(f'd{i}', 0.5)[0] for i in range(64)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {"".join(split_of(f"d{i}", 0.5)[0] for i in range(64)) + "\n"}


def test_texts_split_and_max_bytes(tmp_path):
    for i in range(300):
        (tmp_path / f"{i:03d}.txt").write_text(f"document {i} é東🙂 " * 5, encoding="utf-8")
    d = str(tmp_path)
    everything = list(texts(d))
    train, val = list(texts(d, split="train", val_fraction=0.2)), list(texts(d, split="val", val_fraction=0.2))
    assert len(train) + len(val) == 300 and 30 < len(val) < 90
    assert sorted(train + val) == sorted(everything)
    for cap in (1, 7, 1000, 12345):  # cut at a character boundary, never over the cap
        stats = CorpusStats()
        got = list(texts(d, max_bytes=cap, stats=stats))
        n = sum(len(t.encode("utf-8")) for t in got)
        assert cap - 4 < n <= cap and stats.bytes == n and stats.documents == len(got)
        assert "".join(got) == "".join(everything).encode("utf-8")[:n].decode("utf-8")
    # the text that reaches the cap is the last one, even when cutting it at a character leaves nothing
    assert list(texts(d, max_bytes=len("document 0 ".encode()) + 1)) == ["document 0 "]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "1.txt").write_text("é", encoding="utf-8")
    (tmp_path / "x" / "2.txt").write_text("a", encoding="utf-8")
    assert list(texts(str(tmp_path / "x"), max_bytes=1)) == []
    with pytest.raises(GlassmindError, match="split must be"):
        texts(d, split="test")
    with pytest.raises(GlassmindError, match="max_bytes must be positive"):
        texts(d, max_bytes=0)


def test_describe(tmp_path):
    (tmp_path / "a.txt").write_text("héllo", encoding="utf-8")
    (tmp_path / "b.bin").write_bytes(b"\xff\x00\xfe")
    stats = describe(str(tmp_path))
    assert (stats.documents, stats.bytes, len(stats.skipped)) == (1, 6, 1)
    assert stats.summary().startswith("1 documents, 6 bytes; 1 file(s) skipped")


def test_jsonl_in_a_folder_is_read_as_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from json"}) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("plain", encoding="utf-8")
    assert [d.text for d in documents(str(tmp_path))] == ["from json", "plain"]
