"""The README's interop table: max abs difference of outputs between transformers and glassmind, per family and
direction, over exactly the configurations tests/test_interop.py checks (read from its parametrize marks, and
computed with its own check functions: random models with every weight moved off its init, padded batches).

    python benchmarks/interop_table.py

transformers -> glassmind: a transformers model converted with interop.from_hf; glassmind -> transformers: a
glassmind model converted with interop.to_hf. Each cell is the largest difference over that family's
configurations (fp32). The tests hold each of them under 1e-5.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_interop as T  # noqa: E402

from glassmind.model import interop  # noqa: E402

transformers = T.transformers


def params(test_fn) -> list:
    """The parameter sets of a test's @pytest.mark.parametrize marks (their cross product, as pytest runs)."""
    sets = [{}]
    for mark in reversed(getattr(test_fn, "pytestmark", [])):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")]
        values = [v if len(names) > 1 else (v,) for v in mark.args[1]]
        sets = [{**s, **dict(zip(names, v))} for s in sets for v in values]
    return sets


def gpt2() -> tuple[float, float]:
    worst_from = 0.0
    for p in params(T.test_gpt2_from_hf):
        torch.manual_seed(0)
        h = T.perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(**p["kw"])))
        worst_from = max(worst_from, T.check_gpt2(interop.from_hf(h), h))
    torch.manual_seed(0)  # test_gpt2_model_without_head
    h = T.perturb(transformers.GPT2Model(transformers.GPT2Config(**T.GPT2_CONFIGS[0])))
    worst_from = max(worst_from, T.check_gpt2(interop.from_hf(h), h))
    worst_to = 0.0
    for p in params(T.test_gpt2_to_hf_and_back):
        g = T.ours("gpt2", **p["kw"])
        worst_to = max(worst_to, T.check_gpt2(g, interop.to_hf(g)))
    return worst_from, worst_to


def bert() -> tuple[float, float]:
    worst_from = 0.0
    for p in params(T.test_bert_from_hf):
        torch.manual_seed(0)
        h = T.perturb(getattr(transformers, p["cls"])(transformers.BertConfig(**p["kw"])))
        worst_from = max(worst_from, T.check_bert(interop.from_hf(h), h))
    worst_to = 0.0
    for p in params(T.test_bert_to_hf_and_back):
        g = T.ours("bert", **{"type_vocab_size": 2, **p["kw"]})
        worst_to = max(worst_to, T.check_bert(g, interop.to_hf(g)))
    return worst_from, worst_to


def seq2seq(family: str) -> tuple[float, float]:
    cls, config = {"bart": ("BartForConditionalGeneration", "BartConfig"),
                   "marian": ("MarianMTModel", "MarianConfig")}[family]
    worst_from = 0.0
    for p in params(T.test_seq2seq_from_hf):
        if p["family"] != family:
            continue
        torch.manual_seed(0)
        h = T.perturb(getattr(transformers, cls)(getattr(transformers, config)(**p["kw"])))
        worst_from = max(worst_from, T.check_seq2seq(interop.from_hf(h), h))
    worst_to = 0.0
    for p in params(T.test_seq2seq_to_hf_and_back):
        if p["family"] != family:
            continue
        g = T.ours(family, **p["kw"])
        worst_to = max(worst_to, T.check_seq2seq(g, interop.to_hf(g)))
    return worst_from, worst_to


def short(x: float) -> str:
    return "0" if x == 0 else f"{x:.2g}".replace("e-0", "e-")


def main() -> None:
    torch.set_num_threads(1)  # fixed, so the numbers repeat: another thread count may round differently
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, 1 thread, fp32\n")
    print("| family | transformers -> glassmind | glassmind -> transformers |")
    print("|---|---|---|")
    for name, fn in (("GPT-2", gpt2), ("BERT", bert), ("BART", lambda: seq2seq("bart")),
                     ("Marian", lambda: seq2seq("marian"))):
        a, b = fn()
        print(f"| {name} | {short(a)} | {short(b)} |")


if __name__ == "__main__":
    main()
