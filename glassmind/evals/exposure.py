"""Exposure read back from an existing run's training data: how many times each fact of the fictional worlds
appears in what the run was pre-trained on, so accuracy vs exposure works on runs the eval did not train.

    pretrain_settings(run)   the run's own pretrain.json, or its nearest ancestor's (lineage read as the report
                             card reads it: card.md 'Parent:' or the settings' parent fields): data sources,
                             max_bytes, val_fraction, steps x batch_tokens
    training_documents(...)  the documents the pretrain recipe's shards put in the *train* split: the same
                             sources, the same max_bytes cut (before the split, as glassmind.data.shards does)
                             and the same split by a hash of each document's id (glassmind.data.corpus.split_of)
    count_facts(texts, facts)  per fact (name, value): the sentences naming both the creature and the value
                             as whole words. Every phrasing of the worlds states one fact per clause with the
                             creature named in that sentence ('Bafo is red.', 'The color of Bafo is red, and ...',
                             'Bafo is a red fox who lives in ...'), so a sentence = one exposure of each fact in it.

Exposure here is occurrences in the training split; a run that read its data for E epochs saw each one about
E times as often (reported beside the counts as steps x batch_tokens / train tokens, not folded in).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from glassmind.common import GlassmindError

SENTENCE = re.compile(r"[^.!?\n]+")


def pretrain_settings(run: Path) -> tuple[Path, dict]:
    """(the run that was pre-trained, its pretrain.json) for `run` or its nearest ancestor."""
    from glassmind.evals.report import lineage

    chain = lineage(Path(run))
    for _, path in chain:
        if path is not None and (path / "pretrain.json").exists():
            return path, json.loads((path / "pretrain.json").read_text(encoding="utf-8"))
    names = " -> ".join(n for n, _ in chain)
    raise GlassmindError(f"{run}: no pretrain.json in its lineage ({names}), so its training data is unknown; "
                         "exposure can be read back only for runs pre-trained by `glassmind pretrain` (a converted "
                         "Hugging Face model's data is not on this machine)")


def training_documents(settings: dict) -> Iterable[str]:
    """The texts of the documents in the train split of a pretrain run with these settings."""
    from glassmind.data.corpus import documents, split_of

    sources, max_bytes, vf = settings.get("data"), settings.get("max_bytes"), settings.get("val_fraction", 0.01)
    total = 0
    try:
        for doc in documents(sources):
            if max_bytes is not None and total >= max_bytes:
                return
            total += len(doc.text.encode("utf-8"))
            if split_of(doc.id, vf) == "train":
                yield doc.text
    except GlassmindError as e:
        raise GlassmindError(f"the run's training data ({sources}) cannot be read back: {e}") from e


def count_facts(texts: Iterable[str], facts: Sequence[tuple[str, str]]) -> list[int]:
    """For each (name, value): the number of sentences (split at . ! ? and newlines) that contain the name
    and the value, each as a whole word."""
    by_name: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(facts):
        by_name.setdefault(name, []).append(i)
    if not by_name:
        return []
    name_re = re.compile(r"\b(" + "|".join(map(re.escape, sorted(by_name, key=len, reverse=True))) + r")\b")
    counts = Counter()
    for text in texts:
        for m in SENTENCE.finditer(text):
            sent = m.group(0)
            found = set(name_re.findall(sent))
            if not found:
                continue
            words = set(re.findall(r"\w+", sent))
            for name in found:
                for i in by_name[name]:
                    if facts[i][1] in words:
                        counts[i] += 1
    return [counts[i] for i in range(len(facts))]


def bin_of(count: int) -> int:
    """0, then powers of two: 1, 2 (2-3), 4 (4-7), 8 (8-15), ... so exposure levels read like the suite's own."""
    return 0 if count <= 0 else 1 << (count.bit_length() - 1)


def read_back(run: Path, facts: Sequence[tuple[str, str]], log=print) -> dict:
    """Counts of each fact in `run`'s training split, with where they came from and the epochs it trained."""
    src, settings = pretrain_settings(run)
    log(f"  counting facts in the training data of {src}: {settings.get('data') or 'the built-in corpus'}")
    n_bytes = 0

    def texts():
        nonlocal n_bytes
        for t in training_documents(settings):
            n_bytes += len(t.encode("utf-8"))
            yield t

    counts = count_facts(texts(), facts)
    return {"counts": counts, "pretrain_run": str(src), "data": settings.get("data"), "train_bytes": n_bytes,
            "trained_tokens": (settings.get("steps") or 0) * (settings.get("batch_tokens") or 0)}
