"""The autopsy's API, narration, report and command line on tiny models of the three families: the JSON
schema the web server relies on, narration rules (numbers beside every sentence, causal verbs only from
ablations and patches, deterministic), an escaped self-contained HTML report, clear errors for bad input,
and a tuned lens that beats the logit lens on held-out tokens."""

from __future__ import annotations

import json
import re

import pytest
import torch

from glassmind.common import GlassmindError
from glassmind.model import ModelConfig, Transformer, save_model
from glassmind.tokenizer.wordpiece import WordPieceTokenizer
from glassmind.autopsy import autopsy_json
from glassmind.autopsy.narrate import has_causal_verb

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds sync

EVIL = "<script>alert(1)</script>"
WORDS = ["[UNK]", "[MASK]", "[SEP]", EVIL] + [f"w{i}" for i in range(4, 40)]


def tokenizer():
    return WordPieceTokenizer({w: i for i, w in enumerate(WORDS)}, special_tokens=["[UNK]", "[MASK]", "[SEP]", EVIL],
                              cls_token=None, sep_token=None)


def model(arch: str, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=len(WORDS), context_length=16, d_model=32, n_heads=2, n_layers=2, **kw)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # a random init writes almost nothing; bigger weights make the numbers non-trivial
        for p in m.parameters():
            p.mul_(4)
    return m


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.parametrize("arch,kw", [("decoder", {}), ("encoder", {}), ("encoder", {"head": "none"}),
                                     ("encoder-decoder", {})])
def test_autopsy_json_has_the_agreed_schema_for_every_family(arch, kw, tok):
    m = model(arch, **kw)
    ids = tok.encode(f"w5 w6 {EVIL} w7 [MASK] w9", allowed_special="all")
    r = autopsy_json(m, tok, ids, top_k=3)
    json.dumps(r, allow_nan=False)
    T = len(r.get("decoder_tokens", r["tokens"]))
    assert r["tokens"][2] == EVIL and len(r["tokens"]) == len(ids)
    assert set(r["target"]) >= {"id", "piece", "prob"} and 0 < r["target"]["prob"] <= 1
    assert len(r["attention"]) == 2 and len(r["attention"][0]) == 2 and len(r["attention"][0][0]) == T
    assert len(r["lens"]) == 3 and len(r["lens"][0]) == T
    cell = r["lens"][1][0]
    assert set(cell) == {"top", "target_prob", "target_rank", "entropy", "kl_to_final"} and len(cell["top"]) == 3
    assert {a["component"] for a in r["attribution"]} >= {"embed", "L0.H0", "L1.H1", "L1.FFN", "rest"}
    assert {"component", "logprob_before", "logprob_after"} <= set(r["ablation"][0])
    assert r["narration"] and all(set(s) >= {"text", "numbers"} for s in r["narration"])
    if arch == "encoder":
        assert r["position"] == 4  # the mask
    if arch == "encoder-decoder":
        assert len(r["cross_attention"][0][0][0]) == len(ids)
    if kw.get("head") == "none":  # a sentence encoder: read against the token embeddings, exactly
        assert r["readout"] == "embedding" and r["attribution_exact"]
        total = sum(a["value"] for a in r["attribution"])
        assert abs(total - r["logit"]) < 1e-4
    # the final lens row is the model's own prediction
    assert abs(r["lens"][-1][r["position"]]["target_prob"] - r["target"]["prob"]) < 1e-5


def test_narration_states_its_numbers_uses_causal_verbs_only_from_interventions_and_is_deterministic(tok):
    m = model("decoder")
    ids = tok.encode("w5 w6 w7 w8 w5 w6 w7", allowed_special="all")
    cmp = tok.encode("w9 w6 w7 w8 w9 w6 w7", allowed_special="all")
    a = autopsy_json(m, tok, ids, compare_ids=cmp)
    b = autopsy_json(m, tok, ids, compare_ids=cmp)
    assert a["narration"] == b["narration"]
    kinds = {s["kind"] for s in a["narration"]}
    assert "causal" in kinds and "observation" in kinds
    for s in a["narration"]:
        assert s["numbers"], s["text"]
        if has_causal_verb(s["text"]):
            assert s["kind"] == "causal", s["text"]
            assert {"logprob_before", "logprob_after"} <= set(s["numbers"]) or "logprob_patched" in s["numbers"] \
                or "largest_change" in s["numbers"], s["text"]
        # every number printed in the sentence is one of its measured numbers, rounded
        stated = {round(float(x), 2) for x in re.findall(r"[-+]?\d+\.\d+", s["text"])}
        measured = set()
        for v in s["numbers"].values():
            for x in (v if isinstance(v, list) else [v]):
                for y in (x if isinstance(x, list) else [x]):
                    if isinstance(y, (int, float)):
                        measured |= {round(y, 2), round(float(torch.tensor(y).exp()), 2)}
        assert stated <= measured, (s["text"], stated - measured)
    # without interventions there are no causal sentences at all
    c = autopsy_json(m, tok, ids, ablate=False)
    assert all(s["kind"] != "causal" and not has_causal_verb(s["text"]) for s in c["narration"])


def test_target_and_layers_heads_restrict_what_is_measured(tok):
    m = model("decoder")
    ids = tok.encode("w5 w6 w7", allowed_special="all")
    r = autopsy_json(m, tok, ids, target=12, layers=[1], heads=[0])
    assert r["target"]["id"] == 12 and r["target"]["piece"] == "w12"
    assert len(r["attention"]) == 1 and len(r["attention"][0]) == 1
    assert sorted(a["component"] for a in r["ablation"]) == ["L1.FFN", "L1.H0"]
    for bad, msg in ((dict(layers=[2]), "layers 0..1"), (dict(heads=[5]), "heads 0..1"),
                     (dict(position=9), "outside the prompt"), (dict(target=999), "outside the vocabulary"),
                     (dict(compare_ids=[5]), "same length")):
        with pytest.raises(GlassmindError, match=msg):
            autopsy_json(m, tok, ids, **bad)
    with pytest.raises(GlassmindError, match="context is 16"):
        autopsy_json(m, tok, [5] * 17)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("run")
    save_model(model("decoder"), d)
    tok.save(d)
    return d


def test_cli_writes_an_escaped_self_contained_report_pngs_and_json(run_dir, tmp_path, capsys):
    from glassmind.__main__ import main

    out = tmp_path / "rep"
    prompt = f"w5 w6 {EVIL} w7"
    assert main(["autopsy", str(run_dir), prompt, "--out", str(out), "--compare", "w9 w6 w8 w7"]) == 0
    printed = capsys.readouterr().out
    assert "report: " in printed and ("The model predicts" in printed or "The target" in printed)
    page = (out / "report.html").read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") >= 5
    data = json.loads((out / "autopsy.json").read_text())
    assert data["tokens"][2] == EVIL and data["patching"]
    assert {p.name for p in out.glob("*.png")} >= {"lens.png", "attention.png", "attribution.png",
                                                    "embeddings_pca.png", "positional.png"}


@pytest.mark.parametrize("args,msg", [
    (["{run}x", "w5"], "not a run directory"),
    (["{run}", "w5 " * 17], "context is 16"),
    (["{run}", "w5", "--target", "w5 w6"], "is 2 tokens"),
    (["{run}", "w5", "--heads", "2"], "heads 0..1"),
    (["{run}", "w5", "--layers", "7"], "layers 0..1"),
    (["{run}", "w5", "--checkpoints"], "keeps no checkpoints"),
])
def test_cli_bad_input_errors_name_the_fix_before_any_work(run_dir, tmp_path, capsys, args, msg):
    from glassmind.__main__ import main

    out = tmp_path / "never"
    argv = ["autopsy"] + [a.format(run=run_dir) for a in args] + ["--out", str(out)]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_tuned_lens_beats_the_logit_lens_on_held_out_tokens_and_is_saved(run_dir, tok):
    from glassmind.autopsy.lens import TunedLens, train_tuned_lens, tuned_lens_for_run

    m = model("decoder")
    data = torch.randint(4, len(WORDS), (64, 16), generator=torch.Generator().manual_seed(0))
    lens, stats = train_tuned_lens(m, tok, ids=data, steps=400, lr=3e-3, batch_tokens=256, eval_every=10,
                                   progress=False)
    # rows but the last: the tuned lens's held-out KL to the final distribution is lower
    for kl_logit, kl_tuned in zip(stats["kl_logit_lens"][:-1], stats["kl_tuned_lens"][:-1]):
        assert kl_tuned < 0.7 * kl_logit
    assert stats["kl_tuned_lens"][-1] == stats["kl_logit_lens"][-1]
    # early stopping: the held-out KL flattens long before the ceiling of 400 steps
    assert stats["max_steps"] == 400 and 10 <= stats["steps"] < 400
    lens.save(run_dir, stats)
    again = TunedLens.load(run_dir, m)
    h = torch.randn(5, 32)
    assert torch.equal(again.translate(0, h), lens.translate(0, h))
    loaded, _ = tuned_lens_for_run(run_dir, m, tok)
    assert torch.equal(loaded.translate(1, h), lens.translate(1, h))


@pytest.mark.parametrize("arch", ["encoder", "encoder-decoder"])
def test_cli_report_for_encoders_and_encoder_decoders(arch, tok, tmp_path, capsys):
    from glassmind.__main__ import main

    run = tmp_path / "run"
    save_model(model(arch), run)
    tok.save(run)
    extra = ["--decoder-prefix", "w8 w9"] if arch == "encoder-decoder" else []
    assert main(["autopsy", str(run), "w5 w6 [MASK] w7", "--out", str(tmp_path / "rep"), "--heads", "1"] + extra) == 0
    data = json.loads((tmp_path / "rep" / "autopsy.json").read_text())
    if arch == "encoder":
        assert data["position"] == 2 and "masked position 2" in capsys.readouterr().out
    else:
        assert data["decoder_tokens"] == ["[SEP]", "w8", "w9"] and data["position"] == 2
        assert (tmp_path / "rep" / "cross_attention.png").exists()
        assert (tmp_path / "rep" / "encoder_attention.png").exists()
        assert len(data["cross_attention"][0]) == 1 and len(data["cross_attention"][0][0][0]) == 4
