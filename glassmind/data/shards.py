"""Token shards: a corpus tokenized once into flat files of token ids, read back through numpy memmaps.

    <root>/<key>/
        manifest.json         tokenizer fingerprint, sources, split settings, token and byte counts per split,
                              every document (id, split, tokens, bytes), a hash of the corpus content
        train_000000.bin ...  the train split: uint16 ids if the vocabulary fits in 16 bits, else uint32
        val_000000.bin ...    the validation split

Each split is one stream: every document is preceded by the separator token (`<|endoftext|>` for BPE,
`[SEP]` for WordPiece), so the stream reads `sep doc sep doc ...` and a window cut anywhere in it tells the
model where documents begin (GPT-2 joins documents with `<|endoftext|>` the same way). Which split a
document goes to is `corpus.split_of(id)`, a hash of its id, so adding documents never moves old ones.

`key` is a hash of everything that decides the bytes of the shards (tokenizer fingerprint, sources,
split fraction, byte cap, separator, shard size). A second build with the same key reads the corpus once more
to hash its content; if the hash matches the manifest's, the shards are reused without tokenizing.
The folder is written under a temporary name and renamed into place when complete, so a killed build
leaves nothing that looks finished.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from glassmind.common import GlassmindError, atomic_write_json, fsync_dir, is_rank0

FORMAT = 1
SPLITS = ("train", "val")
SEPARATORS = ("<|endoftext|>", "[SEP]")


def default_root() -> Path:
    """Where shards live unless told otherwise: $GLASSMIND_CACHE/shards, else ~/.cache/glassmind/shards."""
    base = os.environ.get("GLASSMIND_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "glassmind")
    return Path(base) / "shards"


def separator_id(tokenizer) -> int:
    """The id joining documents: `<|endoftext|>` (BPE) or `[SEP]` (WordPiece)."""
    for name in SEPARATORS:
        i = tokenizer.special_tokens.get(name)
        if i is not None:
            return i
    raise GlassmindError(f"the tokenizer has none of the separator tokens {SEPARATORS}: train it with "
                         "`glassmind tokenizer train` (BPE registers <|endoftext|>, WordPiece [SEP])")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------------
# reading


class TokenStream:
    """One split as a single sequence of ids spread over shard files (memory-mapped, read lazily)."""

    def __init__(self, paths: Sequence[Path], dtype: np.dtype):
        self.dtype = dtype
        self.maps = [np.memmap(p, dtype=dtype, mode="r") for p in paths if os.path.getsize(p) > 0]
        self.starts = [0]
        for m in self.maps:
            self.starts.append(self.starts[-1] + len(m))

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, n: int) -> np.ndarray:
        """ids[start : start + n], crossing shard boundaries when it has to."""
        if start < 0 or start + n > len(self):
            raise IndexError(f"read [{start}, {start + n}) outside a stream of {len(self)} tokens")
        out, pos, end = [], start, start + n
        i = bisect.bisect_right(self.starts, pos) - 1
        while pos < end:
            local = pos - self.starts[i]
            take = min(end - pos, len(self.maps[i]) - local)
            out.append(self.maps[i][local : local + take])
            pos += take
            i += 1
        if len(out) == 1:
            return np.asarray(out[0])
        return np.concatenate(out) if out else np.empty(0, dtype=self.dtype)


@dataclass
class Shards:
    path: Path
    manifest: dict

    def split(self, name: str) -> TokenStream:
        info = self.manifest["splits"][name]
        return TokenStream([self.path / f for f in info["files"]], np.dtype(self.manifest["dtype"]))

    def tokens(self, name: str) -> int:
        return self.manifest["splits"][name]["tokens"]

    def bytes_per_token(self, name: str) -> float:
        """UTF-8 bytes of text per token of a split (separators counted as tokens): what turns nats per
        token into bits per byte, a measure that does not depend on the tokenizer."""
        info = self.manifest["splits"][name]
        return info["bytes"] / max(info["tokens"], 1)


def open_shards(path: str | os.PathLike) -> Shards:
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GlassmindError(f"{path} holds no manifest.json: build the shards again") from None
    return Shards(path, manifest)


# ----------------------------------------------------------------------------------------------------
# building


def _source_spec(sources: str | Sequence[str] | None) -> list[str] | None:
    """Sources as the key sees them: local paths made absolute, so `data/x` from two folders differ."""
    if sources is None:
        return None
    if isinstance(sources, str):
        sources = [sources]
    out = []
    for s in sources:
        path, sep, field = s.partition(".jsonl:")  # `data.jsonl:field`: the path is before the field
        path = path + ".jsonl" if sep else s
        if not s.startswith("hf:") and Path(path).exists():
            s = str(Path(path).resolve()) + (":" + field if sep else "")
        out.append(s)
    return out


def _documents(sources, max_bytes: int | None) -> Iterator:
    from glassmind.data.corpus import documents

    total = 0
    for doc in documents(sources):
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(doc.text.encode("utf-8"))
        yield doc


def _content_hash(docs: Iterable) -> str:
    h = hashlib.sha256()
    for doc in docs:
        for part in (doc.id, doc.text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def shard_key(tokenizer, sources, *, val_fraction: float, max_bytes: int | None, shard_tokens: int) -> str:
    blob = json.dumps({"format": FORMAT, "tokenizer": tokenizer.fingerprint(), "sources": _source_spec(sources),
                       "val_fraction": val_fraction, "max_bytes": max_bytes, "separator": separator_id(tokenizer),
                       "shard_tokens": shard_tokens}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def build_shards(tokenizer, sources: str | Sequence[str] | None = None, *, root: str | os.PathLike | None = None,
                 val_fraction: float = 0.01, max_bytes: int | None = None, shard_tokens: int = 2**27,
                 progress: bool = True, batch_docs: int = 64) -> Shards:
    """Tokenize `sources` (None = the built-in corpus) into shards under `root`, or reuse matching ones.

    Only rank 0 writes; under torch.distributed the other ranks wait at a barrier and then open the result.
    """
    import torch.distributed as dist

    root = Path(root) if root is not None else default_root()
    key = shard_key(tokenizer, sources, val_fraction=val_fraction, max_bytes=max_bytes, shard_tokens=shard_tokens)
    final = root / key
    if is_rank0():
        from tqdm import tqdm

        docs = tqdm(_documents(sources, max_bytes), desc="reading corpus", unit=" docs", disable=not progress,
                    mininterval=1.0)
        content = _content_hash(docs)
        if not _matches(final, content):
            tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
            try:
                _write(tmp, final, tokenizer, sources, content, val_fraction=val_fraction, max_bytes=max_bytes,
                       shard_tokens=shard_tokens, progress=progress, batch_docs=batch_docs)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return open_shards(final)


def _matches(path: Path, content: str) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("content_sha256") == content and all(
        (path / f).is_file() for s in manifest["splits"].values() for f in s["files"])


class _SplitWriter:
    """Appends ids to `<split>_NNNNNN.bin` files, starting a new one every `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.files: list[str] = []
        self.tokens = self.bytes = self.documents = 0
        self._f = None
        self._in_file = 0

    def _next_file(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.files):06d}.bin"
        self.files.append(name)
        self._f = open(self.folder / name, "wb")
        self._in_file = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._f is None or self._in_file == self.shard_tokens:
                self._next_file()
            take = min(len(ids), self.shard_tokens - self._in_file)
            ids[:take].tofile(self._f)
            self._in_file += take
            self.tokens += take
            ids = ids[take:]

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def info(self) -> dict:
        if not self.files:  # an empty split still has a (zero-length) file, so readers need no special case
            self._next_file()
            self.close()
        return {"files": self.files, "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


def _write(tmp: Path, final: Path, tokenizer, sources, content: str, *, val_fraction: float, max_bytes: int | None,
           shard_tokens: int, progress: bool, batch_docs: int) -> None:
    from tqdm import tqdm

    from glassmind.data.corpus import split_of

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    dtype = token_dtype(tokenizer.vocab_size)
    sep = separator_id(tokenizer)
    writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    documents: list[dict] = []
    bar = tqdm(total=max_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               mininterval=1.0)

    def flush(batch: list) -> None:
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
            split = split_of(doc.id, val_fraction)
            w = writers[split]
            nbytes = len(doc.text.encode("utf-8"))
            w.write(np.asarray([sep, *ids], dtype=np.int64))
            w.bytes += nbytes
            w.documents += 1
            documents.append({"id": doc.id, "split": split, "tokens": len(ids) + 1, "bytes": nbytes})
            bar.update(nbytes)
        bar.set_postfix(tokens=sum(w.tokens for w in writers.values()))

    batch: list = []
    for doc in _documents(sources, max_bytes):
        batch.append(doc)
        if len(batch) == batch_docs:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    for w in writers.values():
        w.close()
    if writers["train"].tokens == 0:
        raise GlassmindError(f"the corpus {sources or '(built-in)'} gave no training text: check --data")

    manifest = {
        "format": FORMAT,
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "kind": getattr(tokenizer, "kind", "?"),
                      "vocab_size": tokenizer.vocab_size, "separator": sep},
        "dtype": dtype.name,
        "sources": _source_spec(sources),
        "val_fraction": val_fraction,
        "max_bytes": max_bytes,
        "shard_tokens": shard_tokens,
        "content_sha256": content,
        "splits": {s: w.info() for s, w in writers.items()},
        "documents": documents,
    }
    atomic_write_json(tmp / "manifest.json", manifest)
    fsync_dir(tmp)
    if final.exists():  # stale shards of a changed corpus: move aside, swap in the new ones, then delete
        trash = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
