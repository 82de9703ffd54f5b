"""The limits evals' metrics pinned to hand-worked values, and their generators to the exposure counts they
promise; the position suite's training rows and its whole pipeline at the smoke budget (8-step models that
learn nothing); how suites train their models side by side. Real budgets run by `glassmind eval` (README)."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from glassmind.evals import gen
from glassmind.evals.stats import aurc, bootstrap_ci, coverage_curve, ece, reliability, weat, weat_effect_size, wilson


def test_wilson_interval_matches_hand_worked_values():
    # k=8, n=10, z=1.96: center (0.8 + 0.19208) / 1.38416 = 0.716781; half = 1.96*sqrt(0.016 + 0.0096040)/1.38416
    # = 0.226535 -> [0.4902, 0.9433], the Wilson interval for 8/10 in Newcombe 1998 (Clopper-Pearson would be
    # 0.4439-0.9748). For 0/20 the upper end is z^2/(n+z^2) = 0.1611.
    z = 1.96
    center = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    lo, hi = wilson(8, 10, z=z)
    assert (lo, hi) == pytest.approx((center - half, center + half), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook Wilson interval for 8/10
    assert wilson(0, 20)[0] == 0.0 and wilson(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)  # 0/20: not empty
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_ece_on_a_toy_set_equals_the_hand_sum():
    # bin (0.2,0.3]: conf 0.25,0.25 acc 0/2 -> gap 0.25; bin (0.8,0.9]: conf 0.9,0.9,0.9,0.9 acc 3/4 -> gap 0.15;
    # bin (0.9,1]: conf 1.0,1.0 acc 2/2 -> 0. ECE = 2/8*0.25 + 4/8*0.15 + 0 = 0.0625 + 0.075 = 0.1375
    conf = [0.25, 0.25, 0.9, 0.9, 0.9, 0.9, 1.0, 1.0]
    ok = [0, 0, 1, 1, 1, 0, 1, 1]
    assert ece(conf, ok, bins=10) == pytest.approx(0.1375, abs=1e-12)
    rel = reliability(conf, ok, bins=10)
    assert [r["count"] for r in rel] == [0, 0, 2, 0, 0, 0, 0, 0, 4, 2]  # 0.9 belongs to (0.8, 0.9], not (0.9, 1]
    # perfectly calibrated: confidence 0.5 and half right -> 0
    assert ece([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        ece([1.2], [1])


def test_accuracy_coverage_area_on_a_toy_curve():
    # sorted by score: right, right, wrong, wrong -> accuracy at k=1..4: 1, 1, 2/3, 1/2; mean = 19/24
    score, ok = [0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0]
    cov, acc = coverage_curve(score, ok)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert acc == pytest.approx([1, 1, 2 / 3, 1 / 2])
    assert aurc(score, ok) == pytest.approx(19 / 24)
    # the inverted ranking: 0, 0, 1/3, 1/2 -> 5/24; a constant score is flat at the accuracy (ties kept together)
    assert aurc([0.1, 0.2, 0.3, 0.4], ok) == pytest.approx(5 / 24)
    assert aurc([0.5] * 4, ok) == pytest.approx(0.5)


def test_weat_on_toy_vectors_with_a_known_effect_size():
    # A = e1, B = e2. X's words lie at angles with s(x) = cos(x,e1) - cos(x,e2) = +1 or +0.5... built directly:
    # x1=e1 (s=1), x2=(e1+e3)/sqrt2 (s=0.7071); y1=e2 (s=-1), y2=(e2+e3)/sqrt2 (s=-0.7071).
    # mean_x - mean_y = 0.85355 + 0.85355 = 1.70711; sample std of {1, .7071, -1, -.7071} = sqrt((1+.5+1+.5)/3) = 1
    # -> d = 1.70711
    e1, e2, e3 = np.eye(3)
    r = 1 / math.sqrt(2)
    X = np.stack([e1, (e1 + e3) * r])
    Y = np.stack([e2, (e2 + e3) * r])
    A, B = e1[None], e2[None]
    assert weat_effect_size(X, Y, A, B) == pytest.approx(1 + r, abs=1e-9)
    res = weat(X, Y, A, B)
    # exact permutation test over the C(4,2)=6 partitions: only the observed one reaches its statistic -> 1/6
    assert res["exact"] and res["partitions"] == 6
    assert res["p_value"] == pytest.approx(1 / 6)
    # swapping the targets flips the sign; identical groups give zero
    assert weat_effect_size(Y, X, A, B) == pytest.approx(-(1 + r))


def test_weat_permutation_p_value_is_uniform_ish_when_there_is_no_effect():
    rng = np.random.default_rng(0)
    ps = []
    for i in range(40):
        X, Y, A, B = (rng.normal(size=(4, 8)) for _ in range(4))
        ps.append(weat(X, Y, A, B)["p_value"])
    # under no effect the one-sided p-value is roughly uniform: neither all tiny nor all near 1
    assert 0.3 < float(np.mean(ps)) < 0.7


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(size=30)
    big = rng.normal(size=3000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    blo, bhi = bootstrap_ci(big)
    assert (bhi - blo) < (hi - lo) / 5  # width ~ 1/sqrt(n): 10x fewer -> about 10x narrower


NAME_COLOR = re.compile(r"([A-Z][a-z]+) is (\w+)\.")


def test_exposure_world_states_each_fact_exactly_as_often_as_promised():
    docs, probes = gen.exposure_world((0, 1, 2, 4, 8, 16), per_level=5)
    said = Counter(NAME_COLOR.findall(" ".join(docs)))
    named = Counter(name for (name, _), c in said.items() for _ in range(c))
    for p in probes:
        e = p.condition["exposure"]
        assert said[(p.condition["name"], p.answer)] == e, p
        assert named[p.condition["name"]] == e  # never stated with any other color either
        assert p.answer in p.candidates and p.prompt == f"{p.condition['name']} is"
    assert Counter(p.condition["exposure"] for p in probes) == {e: 5 for e in (0, 1, 2, 4, 8, 16)}


def test_reversal_data_never_states_a_test_fact_in_reverse_unless_augmented():
    for augment in (False, True):
        docs, probes = gen.reversal_data(n_pairs=10, n_bridge=5, augment=augment, repeats=3)
        text = " ".join(docs)
        for p in probes:
            stated = text.count(f"{p.prompt} {p.answer}.")
            if p.condition["direction"] == "forward":
                assert stated == 3
            else:
                assert stated == (3 if augment else 0)
        # the reverse template is learned from the bridge pairs in both variants
        assert text.count("'s child is") >= 15


def test_position_probes_place_the_asked_record_where_they_say():
    from glassmind.evals import position as pos

    words = pos.vocabulary()
    items = pos.probes(4)
    assert len(items) == 4 * len(pos.TEST_RECORDS) * len(pos.PLACES)
    for p in items:
        text = " ".join(words[i] for i in p["ids"])
        records = re.findall(r"([A-Z][a-z]+) ([a-z]+) \.", text)
        asked = text.split()[-1]
        n = p["n_records"]
        assert len(records) == n and len({k for k, _ in records}) == n
        index = [k for k, _ in records].index(asked)
        assert index == {"start": 0, "middle": n // 2, "end": n - 1}[p["position"]] == p["index"]
        assert records[index][1] == words[p["answer"]]


def test_position_training_rows_put_the_loss_on_lookups_and_determined_copies_only():
    import random

    from glassmind.evals import position as pos

    rng = random.Random(0)
    for n in (1, 5, 16):
        ids, tgt = pos.lookup_row(rng, n)
        assert len(ids) == len(tgt) == 6 * n
        records = {ids[3 * i]: ids[3 * i + 1] for i in range(n)}
        asked = [ids[t] for t in range(len(ids)) if tgt[t] != -100]
        assert sorted(asked) == sorted(records)  # every key asked once, after all records
        assert all(t >= 3 * n for t in range(len(ids)) if tgt[t] != -100)
        assert all(tgt[t] == records[ids[t]] == ids[t + 1] for t in range(len(ids)) if tgt[t] != -100)
    for _ in range(20):
        ids, tgt = pos.copy_row(rng)
        marked = [t for t in range(len(ids)) if tgt[t] != -100]
        # a target is set exactly where the next token has occurred before at the period's distance
        m = marked[0] + 1
        assert all(tgt[t] == ids[t + 1] == ids[t + 1 - m] for t in marked)
        assert marked == list(range(m - 1, len(ids) - 1))
    ids, tgt = pos.batch(rng, rows=4)
    assert ids.shape == (4, pos.CONTEXT) and int(ids.max()) < pos.VOCAB


@pytest.mark.parametrize("fmt", ["plain", "reversed", "hints"])
def test_arithmetic_test_sums_are_unseen_and_of_the_promised_length(fmt):
    docs, probes = gen.arithmetic_data(train_digits=2, test_digits=(1, 2, 3), n_train=500, n_test=10, fmt=fmt)
    lines = {line for d in docs for line in d.split(";") if line}
    assert len(lines) > 400

    def value(s):  # read a number back, independently of gen.number
        if fmt == "plain":
            return int(s), len(s)
        if fmt == "hints":
            letters, digits_ = s[0::2], s[1::2]
            start = "abcdefghij".index(letters[0])
            assert letters == "abcdefghij"[start:start + len(digits_)]  # consecutive hints from one offset
            s = digits_
        return int(s[::-1]), len(s)

    for p in probes:
        assert p.prompt.startswith(";") and p.prompt.endswith("=")
        a, b = p.prompt[1:-1].split("+")
        (A, la), (B, lb) = value(a), value(b)
        assert la == lb == p.condition["digits"] and (A, B) == (p.condition["a"], p.condition["b"])
        assert value(p.answer)[0] == A + B
        assert f"{p.prompt[1:]}{p.answer}" not in lines
        if fmt == "hints":
            assert a[0] == b[0] == p.answer[0] == "a"  # tests start at the units' letter
    offsets = set()
    for line in lines:
        left, s = line.split("=")
        a, b = left.split("+")
        (A, la), (B, lb) = value(a), value(b)
        assert value(s)[0] == A + B and la <= 2 and lb <= 2
        if fmt == "hints":
            assert a[0] == b[0] == s[0]  # one offset per line: the same letter marks the same significance
            offsets.add(a[0])
    if fmt == "hints":  # every offset 0 .. len(HINTS) - train_digits - 1 is used
        assert offsets == set("abcdefghij"[:len(gen.HINTS) - 2])


def test_every_digits_format_states_the_same_additions():
    same = [gen.arithmetic_data(train_digits=2, test_digits=(1, 3), n_train=50, n_test=5, fmt=f) for f in gen.ARITH_FORMATS]
    assert len({tuple((p.condition["a"], p.condition["b"]) for p in probes) for _, probes in same}) == 1
    assert [int(line.split("+")[0]) for line in same[0][0][0].split(";") if line] == [
        int(line.split("+")[0][::-1]) for line in same[1][0][0].split(";") if line]


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5])
def test_planted_bias_corpus_hits_its_rate(rate):
    text = " ".join(gen.planted_bias_corpus(rate, n_sentences=8000, seed=3))
    pairs = re.findall(r"The (\w+) [^.]*? because (he|she) wanted", text)
    for occs, pron in ((gen.MALE_CODED, "he"), (gen.FEMALE_CODED, "she")):
        sel = [p for o, p in pairs if o in occs]
        share = sum(p == pron for p in sel) / len(sel)
        assert abs(share - (0.5 + rate / 2)) < 0.035  # ~2700 sentences per group: 3.5 standard errors
    neutral = [p for o, p in pairs if o in gen.NEUTRAL]
    assert abs(sum(p == "he" for p in neutral) / len(neutral) - 0.5) < 0.035


# ------------------------------------------------------------------------------------------------------
# the verbs' seams (no training)


def _fake_run(path, parent=None, title="fake"):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "card.md").write_text(f"# {title}\n\nwhat\n\nParent: {parent or 'none (trained from scratch)'}\n\n"
                                  "| quantity | value |\n|---|---|\n| loss | 1.5 |\n")
    return path


def test_report_card_follows_lineage_escapes_text_and_inlines_images(tmp_path):
    from glassmind.evals import output, report

    a = _fake_run(tmp_path / "pre", title="pretrain")
    b = _fake_run(tmp_path / "sft", parent=str(a), title="sft <script>alert(1)</script>")
    c = _fake_run(tmp_path / "dpo", parent=str(b), title="dpo")
    ev = c / "evals" / "toy"
    ev.mkdir(parents=True)
    fig, ax = output.figure()
    ax.plot([0, 1], [0, 1])
    plot = output.save(fig, ev / "toy.png")
    output.write_result(ev, suite="toy", title="Toy <b>eval</b>", what="w", numbers={"acc": "0.500 [0.300, 0.700]"},
                        plots=[plot], command="glassmind eval x --suite toy")
    res = report.build(c)
    page = res["report"].read_text()
    assert res["lineage"] == [str(c), str(b), str(a)]
    assert "<script>" not in page and "&lt;script&gt;" in page  # text from files is escaped
    assert "Toy &lt;b&gt;eval&lt;/b&gt;" in page and "0.500 [0.300, 0.700]" in page
    srcs = __import__("re").findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained: no file or CDN
    assert (c / "report" / "summary.png").exists() and res["summary"] is not None


def test_calibration_refuses_an_encoder_and_names_what_applies(tmp_path):
    from glassmind.common import GlassmindError
    from glassmind.evals.cli import run_suite

    run = _fake_run(tmp_path / "enc")
    (run / "config.json").write_text('{"arch": "encoder"}')
    (run / "tokenizer.json").write_text('{"added_tokens": [{"content": "[MASK]"}]}')
    with pytest.raises(GlassmindError, match="encoder or encoder-decoder.*--suite bias"):
        run_suite("calibration", [run], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any output


def test_calibration_of_a_pretrained_decoder_is_3_shot_and_its_confidence_is_the_replys_probability(tmp_path):
    """A base model (no chat tokens) is prompted 3-shot in plain text; its confidence is the probability of
    the reply up to and including the token that wrote the newline, recomputed here by one plain forward
    pass per reply; the suite runs on it as the first lifecycle stage."""
    import numpy as np
    import torch

    from glassmind import tokenizer as tok_lib
    from glassmind.data import tasks as T
    from glassmind.evals import calibration
    from glassmind.evals.cli import run_suite
    from glassmind.model import ModelConfig, Transformer, load_model, save_model
    from glassmind.tokenizer.bpe import BPETokenizer

    texts = [f"Question: {e.prompt}\nAnswer: {e.answer}\n\n" for t in T.TASKS for e in T.pool(t)[:100]]
    tok = BPETokenizer.train(texts, 400, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, context_length=128, d_model=32, n_heads=2,
                                    n_layers=1, lm_head_bias=True))
    with torch.no_grad():  # a random model rarely writes a newline: favour the tokens that hold one, so that
        # some replies end at their terminator after a few tokens, as a trained base model's do
        for t in range(tok.vocab_size):
            if "\n" in tok.decode([t]):
                model.lm_bias[t] = 2.5
    base = tmp_path / "base"
    save_model(model, base)
    tok.save(base)
    m = calibration.measure_few_shot(base, per_task=2)
    model, tok = load_model(base).eval(), tok_lib.load(base)
    examples = T.heldout_examples(2)
    prompts = [tok.encode(x)[-(128 - 12):] for x in T.few_shot_prompts(examples, 3)]
    assert all(x.endswith("Answer:") and x.count("Question:") == 4 for x in T.few_shot_prompts(examples, 3))
    from glassmind.train.chat_runs import generate

    eos = tok.special_tokens["<|endoftext|>"]
    want, cut = [], 0
    for p, r in zip(prompts, generate(model, prompts, eos, max_new_tokens=12)):
        r = [i for i in r if i != eos]
        ends = [j for j, t in enumerate(r) if "\n" in tok.decode([t])]
        r = r[:ends[0] + 1] if ends else r
        cut += bool(ends)
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).float(), -1)[0]
        want.append(float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(r))))
    assert np.allclose(m["confidence"], np.exp(want), rtol=1e-4, atol=1e-7)
    assert cut > 0  # some replies did end at a newline, so the terminator's probability is in the check
    assert m["prompting"] == "3-shot" and len(m["correct"]) == len(examples)
    res = run_suite("calibration", [base], tmp_path / "out", "quick")
    assert res["numbers"]["prompting, base"] == "3-shot" and "ECE, base" in res["numbers"]


def test_eval_verb_rejects_a_directory_that_is_not_a_run(tmp_path, capsys):
    from glassmind.evals.cli import main

    assert main([str(tmp_path), "--suite", "position"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_quick_suite_skips_calibration_for_an_encoder_only(tmp_path):
    from glassmind.evals.cli import applicable

    run = _fake_run(tmp_path / "pre")
    (run / "tokenizer.json").write_text("{}")
    assert "calibration" in applicable(run)  # a pre-trained decoder: 3-shot
    (run / "config.json").write_text('{"arch": "encoder"}')
    assert "calibration" not in applicable(run)
    (run / "config.json").write_text('{"arch": "encoder-decoder"}')
    assert "calibration" not in applicable(run)
    (run / "config.json").write_text('{"arch": "decoder"}')
    (run / "tokenizer.json").write_text('{"x": "<|assistant|>"}')
    assert "calibration" in applicable(run)


# ------------------------------------------------------------------------------------------------------
# how the evals read a model: pinned to one unpadded forward pass per sequence


class _CharTok:
    """A tokenizer of single characters (ids 1..), enough to drive the scorers."""

    special_tokens = {"<|endoftext|>": 0}

    def encode(self, text):
        return [1 + "abcdefgh ".index(c) for c in text]

    def decode(self, ids):
        return "".join("abcdefgh "[i - 1] if i else "|" for i in ids)


def _tiny_decoder():
    import torch

    from glassmind.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=12, context_length=32, d_model=16, n_heads=2, n_layers=1,
                                   positional="rope")).eval()


def test_candidate_logprobs_equal_the_sum_over_each_candidates_tokens():
    import torch

    from glassmind.evals import toy

    model, tok = _tiny_decoder(), _CharTok()
    prompts, cands = ["ab c", "h", ""], [("d", "ee", "fgh"), ("a",), ("ab", "b")]
    got = toy.candidate_logprobs(model, tok, prompts, cands, batch_size=3)  # batches cut across prompts
    for p, cs, row in zip(prompts, cands, got):
        for c, lp in zip(cs, row):
            pid = tok.encode(p) or [0]
            ids = pid + tok.encode((" " + c) if p else c)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
            want = sum(logp[t - 1, ids[t]].item() for t in range(len(pid), len(ids)))
            assert lp == pytest.approx(want, abs=1e-5)


def test_greedy_continuations_match_step_by_step_argmax():
    import torch

    from glassmind.evals import toy

    model, tok = _tiny_decoder(), _CharTok()
    prompts = ["abc", "d", "hgf"]
    got = toy.greedy(model, tok, prompts, max_new_tokens=4)
    for p, g in zip(prompts, got):
        ids = tok.encode(p)
        with torch.no_grad():
            for _ in range(4):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert g == tok.decode(ids[len(tok.encode(p)):]).strip()


def test_abstention_signals_on_a_hand_worked_distribution():
    from glassmind.evals.hallucination import signals

    # unnormalised: the candidates' log-probabilities need not sum to one over the closed set (here 0.5 and 0.3)
    lps = np.log([[0.35, 0.1, 0.05], [0.1, 0.1, 0.1]])
    s = signals(lps)
    assert s["choice"].tolist() == [0, 0]
    assert s["confidence"] == pytest.approx([0.7, 1 / 3])
    assert s["entropy"] == pytest.approx([0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1),
                                          math.log(1 / 3)])
    assert s["logprob"] == pytest.approx([math.log(0.35), math.log(0.1)])  # the sequence's own log-probability
    # a one-hot distribution always agrees with itself
    assert signals(np.log([[1.0, 1e-30]]))["agreement"][0] == 1.0


def test_train_many_runs_a_suites_models_side_by_side_in_order_and_splits_the_threads(monkeypatch):
    """Two cores: two models train at once with one torch thread each, results come back in the jobs'
    order whatever finishes first, and one core (threads=1) trains them one after another."""
    import threading
    import time as _time

    from glassmind.evals import toy

    lock, running, seen = threading.Lock(), [0], []

    def fake_train(out, docs, *, threads=None, log=print, **kw):
        with lock:
            running[0] += 1
            seen.append((out, threads, running[0]))
        _time.sleep(0.3 if out == "a" else 0.05)  # the first job finishes last
        with lock:
            running[0] -= 1
        return f"run-{out}"

    monkeypatch.setattr(toy, "train", fake_train)
    assert toy.train_many([dict(out=o, docs=[]) for o in "ab"], threads=2, log=lambda *a: None) == ["run-a", "run-b"]
    assert {t for _, t, _ in seen} == {1} and max(n for *_, n in seen) == 2
    seen.clear()
    assert toy.train_many([dict(out=o, docs=[]) for o in "abc"], threads=1, log=lambda *a: None) == [
        "run-a", "run-b", "run-c"]
    assert max(n for *_, n in seen) == 1 and {t for _, t, _ in seen} == {1}
    seen.clear()
    toy.train_many([dict(out="a", docs=[])], threads=2, log=lambda *a: None)
    assert seen[0][1] == 2  # a lone model gets both cores


def test_train_many_raises_a_failed_training_after_the_others_finish(monkeypatch):
    from glassmind.common import GlassmindError
    from glassmind.evals import toy

    done = []

    def fake_train(out, docs, *, threads=None, log=print, **kw):
        if out == "bad":
            raise GlassmindError("training bad failed")
        done.append(out)
        return out

    monkeypatch.setattr(toy, "train", fake_train)
    with pytest.raises(GlassmindError, match="training bad failed"):
        toy.train_many([dict(out=o, docs=[]) for o in ("bad", "good")], threads=2, log=lambda *a: None)
    assert done == ["good"]


def test_the_position_suite_runs_end_to_end_and_reuses_its_models(tmp_path, capsys):
    import json

    from glassmind.evals.cli import run_suite

    out = tmp_path / "position"
    res = run_suite("position", [], out, budget="smoke", threads=1)
    rows = (out / "points.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 4 * 3  # header, encodings x lengths x places
    assert (out / "position.png").stat().st_size > 0 and len(res["runs"]) == 3
    for run in res["runs"]:
        curve = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
        assert curve[-1]["step"] == 8 and (tmp_path / run).exists()
    assert any("records" in n for n in res["notes"])
    capsys.readouterr()
    run_suite("position", [], out, budget="smoke", threads=1)
    assert "3 finished (skipped)" in capsys.readouterr().out


def test_the_report_figure_keeps_a_fair_share_of_every_suites_numbers():
    from glassmind.evals.report import figure_rows

    bars = [(f"big: {i}", 0.5, 0.4, 0.6) for i in range(60)] + [(f"small: {i}", 0.5, 0.4, 0.6) for i in range(3)] + \
        [(f"mid: {i}", 0.5, 0.4, 0.6) for i in range(20)]
    rows = figure_rows(bars, cap=48)
    count = {s: sum(r[0].startswith(s + ":") for r in rows) for s in ("big", "small", "mid")}
    assert len(rows) == 48 and count["small"] == 3 and count["mid"] == 20 and count["big"] == 25
    assert [r for r in bars if r in rows] == rows  # order kept, each suite's first rows
    assert rows[0][0] == "big: 0" and ("big: 25", 0.5, 0.4, 0.6) not in rows
    assert figure_rows(bars[:10], cap=48) == bars[:10]
