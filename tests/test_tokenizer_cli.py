"""`glassmind tokenizer train|encode`: what it prints, what it saves, and how bad input fails (exit 2)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from glassmind.tokenizer import load
from glassmind.tokenizer.cli import main

TEXT = ("The tokenizer splits text into pieces. Pieces become ids; ids become vectors. "
        "Naïve café owners tokenize menus. [MASK] is not special unless allowed. ") * 40


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_train_and_encode_wordpiece(capsys, tmp_path, corpus_file):
    out_dir = tmp_path / "wp"
    code, out, err = run(capsys, "train", "--kind", "wordpiece", "--vocab-size", "100", "--input",
                         str(corpus_file), "--out", str(out_dir))
    assert code == 0, err
    assert f"on {corpus_file}" in out and f"corpus: 1 documents, {len(TEXT.encode()):,} bytes" in out
    assert "trained wordpiece: 100 tokens in" in out and f"saved {out_dir / 'tokenizer.json'}" in out
    assert "merging pieces" in err  # tqdm progress goes to stderr
    tok = load(out_dir)
    assert tok.kind == "wordpiece" and tok.vocab_size == 100

    code, out, _ = run(capsys, "encode", str(out_dir), "tokenizer pieces [MASK]")
    ids = tok.encode("tokenizer pieces [MASK]")
    assert code == 0 and f"{len(ids)} tokens" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [(int(i), piece) for i, piece in rows] == [(i, tok.id_to_token(i)) for i in ids]
    assert "[MASK]" not in [piece for _, piece in rows]

    code, out, _ = run(capsys, "encode", str(out_dir), "pieces [MASK]", "--allow-special")
    assert code == 0 and out.splitlines()[-1].split() == [str(tok.token_to_id("[MASK]")), "[MASK]"]


def test_train_and_encode_bpe(capsys, tmp_path, corpus_file):
    tokenizers = pytest.importorskip("tokenizers")
    out_dir = tmp_path / "bpe"
    code, out, err = run(capsys, "train", "--kind", "bpe", "--vocab-size", "300", "--pattern", "gpt2",
                         "--input", str(corpus_file), "--out", str(out_dir))
    assert code == 0, err
    assert "trained bpe: 300 tokens" in out
    tok = load(out_dir)
    ref = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    assert tok.kind == "bpe" and tok.encode(TEXT[:500]) == ref.encode(TEXT[:500]).ids

    monkey_text = "Naïve café <|endoftext|>"
    code, out, _ = run(capsys, "encode", str(out_dir), monkey_text, "--allow-special")
    ids = tok.encode(monkey_text, allowed_special="all")
    assert code == 0 and f"{len(ids)} tokens" in out
    assert [int(line.split()[0]) for line in out.splitlines()[2:]] == ids
    assert "'<|endoftext|>'" in out.splitlines()[-1]  # the decoded text of each piece is shown too


def test_train_on_builtin_corpus_and_encode_from_stdin(capsys, tmp_path, monkeypatch):
    out_dir = tmp_path / "builtin"
    code, out, err = run(capsys, "train", "--kind", "wordpiece", "--vocab-size", "400", "--max-bytes", "200000",
                         "--out", str(out_dir))
    assert code == 0, err
    assert "the built-in corpus" in out and "first 200,000 bytes" in out and "0.2 MB" in out
    monkeypatch.setattr(sys, "stdin", io.StringIO("import os"))
    code, out, _ = run(capsys, "encode", str(out_dir), "-")
    assert code == 0 and "for 9 characters" in out


@pytest.mark.parametrize("argv,message", [
    (["--kind", "bpe", "--vocab-size", "100"], "--vocab-size >= 257"),
    (["--kind", "wordpiece", "--vocab-size", "12"], "alphabet alone is"),
    (["--kind", "bpe", "--vocab-size", "300", "--cased"], "WordPiece options"),
    (["--kind", "wordpiece", "--vocab-size", "300", "--max-bytes", "0"], "--max-bytes must be positive"),
    (["--kind", "wordpiece", "--vocab-size", "300", "--min-frequency", "0"], "--min-frequency must be >= 1"),
])
def test_train_bad_arguments_exit_2(capsys, tmp_path, corpus_file, argv, message):
    code, _, err = run(capsys, "train", *argv, "--input", str(corpus_file), "--out", str(tmp_path / "o"))
    assert code == 2 and "glassmind: error: " in err and message in err
    assert not (tmp_path / "o" / "tokenizer.json").exists()


def test_train_bad_input_exit_2(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)))
    out = str(tmp_path / "o")
    cases = [(str(empty), "corpus is empty"), (str(binary), "is not UTF-8"),
             (str(tmp_path / "missing.txt"), "no such file or directory"),
             (str(tmp_path / "*.none"), "matches no files")]
    for source, message in cases:
        for kind, size in (("wordpiece", "300"), ("bpe", "300")):
            code, _, err = run(capsys, "train", "--kind", kind, "--vocab-size", size, "--input", source, "--out", out)
            assert code == 2 and message in err, (kind, source, err)
    code, _, err = run(capsys, "train", "--kind", "bpe", "--vocab-size", "300", "--input", str(binary), "--out",
                       str(empty))
    assert code == 2 and "is a file" in err


def test_encode_bad_input_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "encode", str(tmp_path / "nothing"), "hi")
    assert code == 2 and "no tokenizer at" in err and "glassmind tokenizer train" in err
    code, _, err = run(capsys, "encode", str(tmp_path), "hi")  # a folder without tokenizer.json
    assert code == 2 and "holds no tokenizer.json" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--vocab-size", "300", "--out", "x"])  # --kind missing
    assert e.value.code == 2 and "--kind" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_command_line_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "glassmind", "tokenizer", "encode", str(tmp_path / "none"), "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("glassmind: error: no tokenizer at")
