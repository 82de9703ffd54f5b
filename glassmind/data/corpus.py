"""Where text comes from: the built-in corpus, files, globs, JSONL fields and local HF datasets.

The built-in corpus is on every machine that runs Python and needs no download: the standard library's
own `.py` sources (sorted paths under `sysconfig.get_paths()["stdlib"]`, without site-packages), then
every documentation topic in `pydoc_data.topics` (what `help("with")` shows), one document each.

Everything streams (generators): the standard library alone is tens of MB. Files are decoded
deliberately: UTF-8 first, then the PEP 263 coding cookie (`# -*- coding: koi8-r -*-`) if the file
declares one; a file that is neither is skipped and counted (in `CorpusStats.skipped`), except a file
named on its own, whose failure is an error since the user asked for exactly that file.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import itertools
import json
import os
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterable, Iterator

from glassmind.common import GlassmindError

SOURCE_FORMS = ("a file, a directory, a glob, PATH.jsonl or PATH.jsonl:FIELD, or hf:NAME[:SPLIT[:FIELD]] "
                "(omit --input for the built-in corpus)")


@dataclasses.dataclass(frozen=True)
class Document:
    # stable across runs, machines and where the data lives (the split hashes it): a file's path relative to
    # the folder or glob root it was found under, a single file's name, a JSONL line's "name:line"; never
    # the absolute path (the same data copied elsewhere, or another Python's stdlib, would split otherwise)
    id: str
    text: str


@dataclasses.dataclass
class CorpusStats:
    """Filled in while documents stream past (pass one to `documents` or `texts`)."""

    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the text yielded
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (where, why)

    def summary(self) -> str:
        size = f"{self.bytes:,} bytes" if self.bytes < 100_000 else f"{self.bytes / 1e6:,.1f} MB"
        s = f"{self.documents:,} documents, {size}"
        if self.skipped:
            s += f"; {len(self.skipped)} file(s) skipped as unreadable or not text, e.g. {self.skipped[0][0]}"
        return s


# ------------------------------------------------------------------------------------------------------
# the public seam (docs/contracts.md)


def documents(sources: str | Iterable[str] | None = None, *, stats: CorpusStats | None = None) -> Iterator[Document]:
    """Documents of the built-in corpus (`sources=None`) or of each source in order.

    Empty documents are left out. A corpus that yields no document at all is an error, raised when the
    stream ends. Sources are checked before the first document is read, so a typo fails at once.
    """
    stats = stats if stats is not None else CorpusStats()
    if sources is None:
        streams = [builtin_documents(stats)]
    else:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        sources = [os.fspath(s) for s in sources]
        if not sources:
            raise GlassmindError(f"no sources given: pass {SOURCE_FORMS}")
        streams = [_source_documents(s, stats) for s in sources]
    return _count(streams, stats, sources)


def split_of(doc_id: str, val_fraction: float = 0.01) -> str:
    """"train" or "val" for a document, from a hash of its id: the same on every run, machine and Python
    (Python's own hash() of a str is salted per process, so it would not do)."""
    if not 0.0 <= val_fraction <= 1.0:
        raise GlassmindError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    digest = hashlib.sha1(doc_id.encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "val" if u < val_fraction else "train"


def texts(sources: str | Iterable[str] | None = None, split: str | None = None, max_bytes: int | None = None,
          *, val_fraction: float = 0.01, stats: CorpusStats | None = None) -> Iterator[str]:
    """The text of each document, optionally of one split, stopping after `max_bytes` UTF-8 bytes (the last
    text is cut at a character boundary so the total never exceeds it). Sources are checked at the call;
    `stats` counts the texts yielded (and the files skipped)."""
    if split not in (None, "train", "val"):
        raise GlassmindError(f"split must be 'train', 'val' or None (both), got {split!r}")
    if max_bytes is not None and max_bytes <= 0:
        raise GlassmindError(f"max_bytes must be positive, got {max_bytes}")
    stats = stats if stats is not None else CorpusStats()
    read = CorpusStats(skipped=stats.skipped)
    return _texts(documents(sources, stats=read), split, max_bytes, val_fraction, stats)


def _texts(docs: Iterator[Document], split: str | None, budget: int | None, val_fraction: float,
           stats: CorpusStats) -> Iterator[str]:
    for doc in docs:
        if split is not None and split_of(doc.id, val_fraction) != split:
            continue
        text = doc.text
        n = _utf8_len(text)
        last = budget is not None and n >= budget
        if budget is not None and n > budget:
            text = text.encode("utf-8", "surrogatepass")[:budget].decode("utf-8", "ignore")
            n = _utf8_len(text)
        if text:
            stats.documents += 1
            stats.bytes += n
            yield text
        if last:
            return
        if budget is not None:
            budget -= n


def describe(sources: str | Iterable[str] | None = None) -> CorpusStats:
    """Read the whole corpus once and return its size (documents, bytes, skipped files)."""
    stats = CorpusStats()
    for _ in documents(sources, stats=stats):
        pass
    return stats


# ------------------------------------------------------------------------------------------------------
# the built-in corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every `.py` file of the standard library, sorted by path relative to its root; site-packages (which
    holds what the user installed, not the standard library) is left out."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def builtin_documents(stats: CorpusStats | None = None) -> Iterator[Document]:
    stats = stats if stats is not None else CorpusStats()
    root = stdlib_root()
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        try:
            text = read_text(path)
        except GlassmindError as e:
            stats.skipped.append((f"stdlib/{rel}", str(e)))
            continue
        yield Document(f"stdlib/{rel}", text)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip the documentation data
        stats.skipped.append(("pydoc_data.topics", "not installed with this Python"))
        return
    for name in sorted(topics):
        yield Document(f"pydoc/{name}", topics[name])


def read_text(path: str | os.PathLike) -> str:
    """A file's text: UTF-8 (a BOM is dropped), else the encoding its PEP 263 coding cookie names.

    Raises GlassmindError for a file that cannot be read or decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise GlassmindError(f"cannot read {path}: {e.strerror or e}; check the path and its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as utf8_error:
        encoding = _coding_cookie(data)
        if encoding is None:
            raise GlassmindError(f"{path} is not UTF-8 ({utf8_error.reason} at byte {utf8_error.start}) and "
                                 "declares no coding cookie; convert it to UTF-8") from None
    try:
        return data.decode(encoding)
    except (UnicodeDecodeError, LookupError) as e:
        raise GlassmindError(f"{path} does not decode with its declared encoding {encoding!r}: {e}; convert it "
                             "to UTF-8") from None


def _coding_cookie(data: bytes) -> str | None:
    """The encoding a PEP 263 cookie in the first two lines declares (None if none, or if it is utf-8,
    which has already failed)."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError:  # an unknown encoding name, or a cookie that contradicts a BOM
        return None
    return None if encoding in ("utf-8", "utf-8-sig") else encoding


# ------------------------------------------------------------------------------------------------------
# user sources


def _source_documents(source: str, stats: CorpusStats) -> Iterator[Document]:
    """Check one source now (so a bad one fails before work starts) and return its document stream."""
    if source.startswith("hf:"):
        return _hf_documents(source, stats)
    path, field = _jsonl_field(source)
    if path is not None:
        if not Path(path).is_file():
            raise GlassmindError(f"no such JSONL file: {path}; pass {SOURCE_FORMS}")
        return _jsonl_documents(path, field)
    if any(ch in source for ch in "*?["):
        matches = sorted(m for m in glob.glob(source, recursive=True) if Path(m).is_file())
        if not matches:
            raise GlassmindError(f"the glob {source!r} matches no files; check the pattern (quote it so the "
                                 "shell does not expand it)")
        return _files_documents(matches, stats, _glob_root(source))
    p = Path(source)
    if p.is_dir():
        return _files_documents(_dir_files(p), stats, str(p))
    if p.is_file():
        return _single_file_documents(p)
    raise GlassmindError(f"no such file or directory: {source}; pass {SOURCE_FORMS}")


def _jsonl_field(source: str) -> tuple[str | None, str]:
    """("x.jsonl", "text") for "x.jsonl"; ("x.jsonl", "f") for "x.jsonl:f"; (None, "") otherwise."""
    if source.endswith(".jsonl"):
        return source, "text"
    head, sep, field = source.rpartition(":")
    if sep and head.endswith(".jsonl") and field:
        return head, field
    return None, ""


def _dir_files(root: Path) -> list[str]:
    """Every regular file under `root`, sorted, skipping hidden files and folders (.git and the like)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found)


def _glob_root(pattern: str) -> str:
    """The folder a glob searches from: its leading components without a wildcard ("/lib/py/*.py" -> "/lib/py")."""
    parts = Path(pattern).parts
    fixed = list(itertools.takewhile(lambda c: not any(ch in c for ch in "*?["), parts))
    return str(Path(*fixed)) if fixed else "."


def _single_file_documents(path: Path) -> Iterator[Document]:
    yield Document(path.name, read_text(path))


def _files_documents(paths: list[str], stats: CorpusStats, root: str) -> Iterator[Document]:
    """The files' documents, each id its path relative to `root` (with '/' on every OS)."""
    for path in paths:
        rel = Path(os.path.relpath(path, root)).as_posix()
        if path.endswith(".jsonl"):
            yield from _jsonl_documents(path, "text", id_prefix=rel)
            continue
        try:
            text = read_text(path)
        except GlassmindError as e:
            stats.skipped.append((path, str(e)))
            continue
        yield Document(rel, text)


def _jsonl_documents(path: str, field: str, id_prefix: str | None = None) -> Iterator[Document]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise GlassmindError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GlassmindError(f"{where} is not valid JSON ({e.msg}); each line of a .jsonl file must "
                                         "be one JSON object") from None
                if not isinstance(record, dict) or field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise GlassmindError(f"{where} has no field {field!r} (it has {keys}); pick the text field "
                                         f"with {path}:FIELD")
                value = record[field]
                if not isinstance(value, str):
                    raise GlassmindError(f"{where}: field {field!r} is {type(value).__name__}, not text; pick a "
                                         f"text field with {path}:FIELD")
                yield Document(f"{id_prefix or Path(path).name}:{lineno}", value)
        except UnicodeDecodeError as e:
            raise GlassmindError(f"{path} is not UTF-8 ({e.reason}); JSONL must be UTF-8") from None


def _hf_documents(source: str, stats: CorpusStats) -> Iterator[Document]:
    """hf:NAME[:SPLIT[:FIELD]]: a dataset saved with `save_to_disk` (NAME is its folder) or one already in
    the local Hugging Face cache. Nothing is downloaded: HF_DATASETS_OFFLINE is set before loading."""
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise GlassmindError(f"bad dataset source {source!r}: write hf:NAME, hf:NAME:SPLIT or hf:NAME:SPLIT:FIELD")
    name = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    field = parts[2] if len(parts) > 2 and parts[2] else "text"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise GlassmindError(f"{source} needs the Hugging Face `datasets` package: pip install datasets "
                             "(or export the data to JSONL and pass PATH.jsonl:FIELD)") from None
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError ...)
        raise GlassmindError(f"cannot load dataset {name!r} from local files ({type(e).__name__}: {e}); save it "
                             "with Dataset.save_to_disk(DIR) and pass hf:DIR, or run once online so it is "
                             "in the cache") from None
    if isinstance(ds, dict):  # a DatasetDict (a dict subclass): pick the split
        if split not in ds:
            raise GlassmindError(f"dataset {name!r} has no split {split!r} (it has {sorted(ds.keys())}); pass "
                                 f"hf:{name}:SPLIT")
        ds = ds[split]
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns:
        raise GlassmindError(f"dataset {name!r} split {split!r} has no column {field!r} (it has {columns}); pass "
                             f"hf:{name}:{split}:FIELD")
    # a folder saved with save_to_disk is named by its own name in ids (where it lives must not move the split)
    return _hf_rows(ds, name, split, field, Path(name).name if Path(name).is_dir() else name)


def _hf_rows(ds, name: str, split: str, field: str, id_name: str) -> Iterator[Document]:
    for i, row in enumerate(ds):
        value = row.get(field)
        if not isinstance(value, str):
            raise GlassmindError(f"hf:{name}:{split} row {i}: field {field!r} is {type(value).__name__}, not "
                                 f"text; pass hf:{name}:{split}:FIELD")
        yield Document(f"hf:{id_name}:{split}:{i}", value)


# ------------------------------------------------------------------------------------------------------


def _count(streams: list[Iterator[Document]], stats: CorpusStats, sources) -> Iterator[Document]:
    """Chain the streams, drop empty documents, fill `stats`, and fail if nothing came out."""
    for stream in streams:
        for doc in stream:
            if not doc.text:
                continue
            stats.documents += 1
            stats.bytes += _utf8_len(doc.text)
            yield doc
    if stats.documents == 0:
        where = "the built-in corpus" if sources is None else ", ".join(map(str, sources))
        why = f" ({len(stats.skipped)} files skipped as undecodable)" if stats.skipped else ""
        raise GlassmindError(f"the corpus is empty: {where} holds no text{why}; pass files with some text")


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
