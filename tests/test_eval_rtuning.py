"""R-Tuning (glassmind.evals.rtuning): its SFT labels follow the base model's correctness, abstention is measured
by one rule for the fine-tuned model and the thresholded base model, and the whole pipeline (pretrain, label,
the sft recipe, compare) runs at a tiny budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from glassmind.evals import gen, rtuning


def test_selective_operating_point_on_a_hand_worked_example():
    # answered 0, 1, 3; right only on 0; wrong-and-confident only on 1 (3 is wrong at confidence 0.3)
    m = rtuning.selective([True, True, False, True], [True, False, False, False], [0.9, 0.6, 0.9, 0.3])
    assert m["coverage"] == 0.75 and m["accuracy"] == pytest.approx(1 / 3)
    assert m["confident_wrong"] == 0.25 and m["n_confident_wrong"] == 1


def test_rtuned_abstains_only_when_idk_outweighs_all_answers_together():
    # IDK 0.4, the eight answers 0.6 in all (0.3 on the right one): IDK beats each answer but not their sum
    p = np.array([[0.3] + [0.3 / 7] * 7 + [0.4], [0.05] * 8 + [0.6]])
    d = rtuning.rtuned_decisions(np.log(p), ["red", "red"])
    assert d["answered"].tolist() == [True, False]
    assert d["correct"].tolist() == [True, True]
    assert d["confidence"][0] == pytest.approx(0.5)  # 0.3 / 0.6: over the colors alone, as for the base model
    assert d["score"] == pytest.approx([0.6, 0.4])


def test_abstention_is_measured_the_same_way_for_both_models():
    """An R-tuned model that never says IDK and ranks the colors as the base model does must get the base
    model's numbers exactly: same correctness, same confidence, same coverage and confident-wrong rate."""
    from glassmind.evals.hallucination import signals

    rng = np.random.default_rng(0)
    n = 50
    base = rng.normal(size=(n, len(gen.COLORS))) * 2
    answers = [gen.COLORS[i] for i in rng.integers(0, len(gen.COLORS), n)]
    s = signals(base)
    b_correct = np.array([gen.COLORS[c] == a for c, a in zip(s["choice"], answers)])
    # the R-tuned replies are '<Name> is <color>.': a shared prefix adds one constant per question
    tuned = np.concatenate([base + rng.normal(size=(n, 1)), np.full((n, 1), -1e4)], 1)
    d = rtuning.rtuned_decisions(tuned, answers)
    assert d["answered"].all()
    got = rtuning.selective(d["answered"], d["correct"], d["confidence"])
    want = rtuning.selective(np.ones(n, bool), b_correct, s["confidence"])
    assert got == pytest.approx(want)
    # and the base model thresholded at full coverage answers everything with the same numbers
    assert rtuning.threshold_at_coverage(s["entropy"], b_correct, s["confidence"], 1.0) == pytest.approx(want)
    # at coverage 0.3 it answers its 15 most confident, all of which are at least as confident as the rest
    part = rtuning.threshold_at_coverage(s["entropy"], b_correct, s["confidence"], 0.3)
    assert part["answered"] == 15
    kept = np.sort(s["entropy"])[::-1][:15]
    assert part["accuracy"] == pytest.approx(b_correct[s["entropy"] >= kept[-1]].mean())


def test_sft_labels_are_the_answer_where_right_and_idk_where_wrong():
    probes = [gen.Probe(f"{n} is", c, gen.COLORS, {"name": n, "exposure": 1}) for n, c in
              (("Bafo", "red"), ("Kilu", "blue"), ("Tamo", "green"))]
    convs = rtuning.sft_conversations(probes, [True, False, True])
    replies = [c["messages"][1]["content"] for c in convs]
    assert replies == ["Bafo is red.", rtuning.IDK, "Tamo is green."]
    assert [c["messages"][0]["content"] for c in convs] == [rtuning.QUESTION.format(name=n) for n in ("Bafo", "Kilu", "Tamo")]
    with pytest.raises(ValueError):
        rtuning.sft_conversations(probes, [True])


class _Fmt:
    """A chat format over single characters: prompt = 'u' + question + 'a', reply = reply + 'e'."""

    pad_id = 0

    def _ids(self, text):
        return [1 + "abcdefgh ".index(c) for c in text]

    def render_prompt(self, messages):
        return self._ids("h") + self._ids(messages[0]["content"]) + self._ids("g")

    def render_reply(self, text):
        return self._ids(text) + self._ids("f")


def test_reply_logprobs_equal_one_unpadded_forward_pass_per_reply():
    import torch

    from glassmind.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=12, context_length=32, d_model=16, n_heads=2, n_layers=1,
                                    positional="rope")).eval()
    fmt, qs, rs = _Fmt(), ["ab", "c d"], ["e", "dd", "abc"]
    got = rtuning.reply_logprobs(model, fmt, qs, rs, batch_size=4)  # batches cut across questions
    for i, q in enumerate(qs):
        for j, r in enumerate(rs):
            pid = fmt.render_prompt([{"role": "user", "content": q}])
            ids = pid + fmt.render_reply(r)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
            want = sum(logp[t - 1, ids[t]].item() for t in range(len(pid), len(ids)))
            assert got[i, j] == pytest.approx(want, abs=1e-5)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A decoder pre-trained (30 steps) on the exposure world plus the built-in world's text (2 repeats, a
    document per line): every fact's count in the data is known by construction."""
    from glassmind.data.tasks import world_text
    from glassmind.evals import toy

    docs, probes = gen.exposure_world((0, 1, 4, 16), per_level=6)
    docs = docs + world_text(0, repeats=2).splitlines()  # one document per line: some land in each split
    base = toy.train(tmp_path_factory.mktemp("rt") / "base", docs, steps=30, context=32, batch_tokens=512, threads=1,
                     val_fraction=0.2, log=lambda *a: None)
    return base, probes


def test_exposure_read_back_counts_each_fact_as_often_as_the_data_states_it(tiny_base, tmp_path):
    """Counts read back from the run's recorded data equal the exposures the generator promised, less the
    copies in documents the recipe put in the validation split; read through a child run's lineage too."""
    from glassmind.common import GlassmindError
    from glassmind.data.corpus import documents, split_of
    from glassmind.data.tasks import world
    from glassmind.evals import exposure

    base, probes = tiny_base
    settings = json.loads((base / "pretrain.json").read_text())
    docs = list(documents(settings["data"]))
    val = [d.text for d in docs if split_of(d.id, settings["val_fraction"]) == "val"]
    train = [d.text for d in docs if split_of(d.id, settings["val_fraction"]) == "train"]
    assert any("The color of" in t for t in val) and any("The color of" in t for t in train)  # both splits exercised
    w = world(0)
    shared = {e.name for e in w} & {p.condition["name"] for p in probes}

    def a(word):
        return ("an " if word[0] in "aeiou" else "a ") + word

    facts = [(p.condition["name"], p.answer) for p in probes] + [(e.name, e.color) for e in w]
    # the promise: an exposure-world fact is stated `exposure` times ('<Name> is <color>.'), less its copies in
    # validation documents; a built-in world color is stated in three exact phrasings (data.tasks.world_sentences)
    want = [p.condition["exposure"] - sum(t.count(f"{p.condition['name']} is {p.answer}.") for t in val)
            for p in probes]
    want += [sum(t.count(f"{e.name} is {a(e.color)} {e.kind}") + t.count(f"{e.name} is {e.color}.")
                 + t.count(f"The color of {e.name} is {e.color},") for t in train) for e in w]
    assert any(x > 0 for x in want[len(probes):])
    child = tmp_path / "child"  # a run with no data of its own: its parent's pretrain.json is read
    child.mkdir()
    (child / "config.json").write_text("{}")
    (child / "sft.json").write_text(json.dumps({"parent": str(base)}))
    for run in (base, child):
        got = exposure.read_back(run, facts, log=lambda *a: None)
        assert got["pretrain_run"] == str(base)
        for (name, value), n, m in zip(facts, got["counts"], want):
            if name not in shared:
                assert n == m, (name, value, n, m)
    # the suite's view of the same run: every fact of both worlds scored once, grouped by its counted exposure
    from glassmind.evals.hallucination import readback_facts, readback_run

    rb = readback_run(base, 6, log=lambda *a: None)
    assert sum(r["n"] for r in rb["rows"]) == len(readback_facts(6))
    assert [r["exposure_lo"] for r in rb["rows"]] == sorted({exposure.bin_of(c) for c in
                                                             exposure.read_back(base, readback_facts(6), log=print)["counts"]})
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "config.json").write_text("{}")
    with pytest.raises(GlassmindError, match="no pretrain.json"):
        exposure.read_back(tmp_path / "orphan", facts)


def test_exposure_bins_are_zero_then_powers_of_two():
    assert [exposure_bin(c) for c in (0, 1, 2, 3, 4, 7, 8, 15, 16, 100)] == [0, 1, 2, 2, 4, 4, 8, 8, 16, 64]


def exposure_bin(c):
    from glassmind.evals.exposure import bin_of

    return bin_of(c)


def test_rtuning_pipeline_runs_and_labels_follow_the_base_models_answers(tiny_base, tmp_path):
    """Tiny budget: a base model pre-trained on the exposure world, its answers labelled, the sft recipe run on
    them, the held-out comparison made. Every SFT label is checked against the base model's answer recomputed
    here (argmax of its log-probabilities over the colors), not against what the pipeline says it saw."""
    from glassmind.evals import toy
    from glassmind.evals.hallucination import signals

    base, probes = tiny_base
    model, tok = toy.load(base)
    lps = np.array(toy.candidate_logprobs(model, tok, [p.prompt for p in probes], [p.candidates for p in probes]))
    rt = rtuning.run(tmp_path / "rt", base, probes, signals(lps), steps=4, threads=1, log=lambda *a: None)

    sft_probes = [p for p in probes if rtuning.is_sft_half(p.condition["name"])]
    assert 0 < len(sft_probes) < len(probes)
    assert rt["n_sft"] == len(sft_probes) and rt["n_heldout"] == len(probes) - len(sft_probes)
    rows = [json.loads(line) for line in (tmp_path / "rt" / "rtuning.sft.jsonl").read_text().splitlines()]
    assert len(rows) == len(sft_probes)
    by_name = {p.condition["name"]: (p, row) for p, row in zip(probes, lps)}
    n_right = 0
    for r in rows:
        name = r["messages"][0]["content"].removeprefix("What color is ").removesuffix("?")
        p, row = by_name[name]
        right = gen.COLORS[int(np.argmax(row))] == p.answer
        n_right += right
        assert r["messages"][1]["content"] == (f"{name} is {p.answer}." if right else "I do not know.")
    assert rt["n_sft_idk"] == len(rows) - n_right
    # the fine-tuned run is a real sft run of this base model
    card = (tmp_path / "rt" / "rtuned" / "card.md").read_text()
    assert "SFT" in card and str(base) in card
    assert (tmp_path / "rt" / "rtuned" / "model.safetensors").exists()
    # both models measured on the same held-out questions
    assert rt["rtuned"]["n"] == rt["base_all"]["n"] == rt["n_heldout"]
    assert rt["base_entropy_at_rtuned_coverage"]["answered"] >= rt["rtuned"]["answered"]
    for c in rt["curves"].values():
        assert len(c["curve"][0]) == rt["n_heldout"] and not math.isnan(c["aurc"])


def test_the_hallucination_suite_runs_end_to_end_and_its_table_is_its_models_answers(tiny_base, tmp_path):
    """The whole suite at the smoke budget (models that learn almost nothing; every stage runs): the exposure
    model trained, scored, R-tuned, and a given run read back. Each exposure row's accuracy is recomputed
    here from the trained model's own log-probabilities, so a row scored on the wrong probes or a level
    dropped fails, and the given run's read-back rows account for every fact the read-back scores."""
    import csv

    from glassmind.evals import hallucination, toy
    from glassmind.evals.cli import run_suite
    from glassmind.evals.context import BUDGETS

    base, _ = tiny_base
    out = tmp_path / "h"
    result = run_suite("hallucination", [base], out, budget="smoke", threads=1)
    assert (out / "card.md").exists() and (out / "hallucination.png").exists()
    assert any(p.endswith("readback.png") for p in result["plots"]), result["plots"]
    rows = list(csv.DictReader((out / "points.csv").open()))
    per_level = BUDGETS["smoke"]["probes"]
    _, probes = gen.exposure_world(per_level=per_level)
    model, tok = toy.load(out / "models" / "exposure")
    lps = np.array(toy.candidate_logprobs(model, tok, [p.prompt for p in probes], [p.candidates for p in probes]))
    right = np.array([p.candidates[int(i)] == p.answer for p, i in zip(probes, lps.argmax(1))])
    expo = np.array([p.condition["exposure"] for p in probes])
    levels = [r for r in rows if r["exposure"]]
    assert [int(r["exposure"]) for r in levels] == [0, 1, 2, 4, 8, 16]
    for r in levels:
        m = expo == int(r["exposure"])
        assert int(r["n"]) == per_level == m.sum()
        assert float(r["accuracy"]) == pytest.approx(right[m].mean(), abs=1e-6)
    assert {r["signal"] for r in rows if r["signal"]} == {"entropy", "logprob", "agreement"}
    assert any(r["heldout_model"].startswith("R-tuned") for r in rows)
    readback = [r for r in rows if r.get("readback_run")]
    assert readback and {r["readback_run"] for r in readback} == {str(base)}
    assert sum(int(r["n"]) for r in readback) == len(hallucination.readback_facts(per_level))
