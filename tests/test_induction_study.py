"""The induction study: its pipeline at the tiny budget (seconds: sequences whose repeats can only be found
by content, log-spaced checkpoints, the analysis from outside the model, the demo stage that also writes an
autopsy report of a decoder), and its ground-truth claims on the first 900 steps of the default run (an
induction circuit found by the detector, its ablation dropping copy accuracy to near chance while other heads'
does not, its formation inside the copy loss's steepest drop). The full default run's numbers are in the
README ("The autopsy") with the command."""

from __future__ import annotations

import json

import pytest
import torch

from glassmind.common import GlassmindError
from glassmind.studies import induction

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds sync


def test_sequences_repeat_with_a_random_period_and_mark_what_induction_can_predict():
    ids, copyable = induction.batch_of(64, 8, 20, torch.Generator().manual_seed(0))
    assert ids.shape == (64, 16) and ids.min() >= 1 and ids.max() < 20
    periods = set()
    for row, mask in zip(ids, copyable):
        m = int(mask.float().argmax())  # the first copyable position is the period
        periods.add(m)
        assert torch.equal(row[m:], row[: 16 - m]) and not mask[15] and mask[m:15].all() and not mask[:m].any()
    assert len(periods) >= 4  # no fixed offset a head could learn by position alone


def test_help_prints_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        induction.main(["--help"])
    assert e.value.code == 0 and "--schedule-steps" in capsys.readouterr().out


def test_a_schedule_shorter_than_the_run_is_refused_before_any_work(tmp_path):
    with pytest.raises(GlassmindError, match="--schedule-steps"):
        induction.train(induction.InductionConfig(out=str(tmp_path / "r"), steps=100, schedule_steps=50))
    assert not (tmp_path / "r").exists()


def test_checkpoints_are_log_spaced():
    assert induction.log_steps(1000, 7) == [1, 3, 10, 32, 100, 316, 1000]


def test_tiny_run_trains_keeps_checkpoints_and_analyses(tmp_path, capsys):
    out = tmp_path / "ind"
    assert induction.main(["--out", str(out), "--budget", "tiny", "--half", "6", "--d-model", "32",
                           "--checkpoints", "5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "induction head: L" in printed and "copy accuracy" in printed
    r = json.loads((out / "induction.json").read_text())
    assert r["checkpoint_steps"] == induction.log_steps(30, 5)
    assert len(r["ablation_per_head"]) == 8 and abs(r["chance"] - 1 / 63) < 1e-9
    assert (out / "induction.png").stat().st_size > 0 and (out / "tokenizer.json").exists()
    card = (out / "card.md").read_text()
    assert "glassmind study induction --out" in card and "copy accuracy" in card
    assert r["mechanism"].startswith("none")  # 30 steps: no copying, so no mechanism is claimed
    assert len((out / "checkpoints.csv").read_text().splitlines()) == 1 + len(r["checkpoint_steps"])
    assert len((out / "ablation.csv").read_text().splitlines()) == 1 + 8
    with pytest.raises(GlassmindError, match="already holds a run"):
        induction.train(induction.InductionConfig(out=str(out)))
    # the autopsy verb reads the study's run and follows it across its checkpoints
    from glassmind.__main__ import main

    assert main(["autopsy", str(out), "w3 w9 w4 w3 w9", "--checkpoints", "--out", str(tmp_path / "rep")]) == 0
    data = json.loads((tmp_path / "rep" / "autopsy.json").read_text())
    assert [c["step"] for c in data["checkpoints"]] == r["checkpoint_steps"]


def test_demo_stage_at_the_tiny_budget(tmp_path):
    from glassmind.model import ModelConfig, Transformer, save_model
    from glassmind.tokenizer.bpe import BPETokenizer

    text = "def __init__(self, x):\n    return self.x\nimport os\nimport sys\nfor i in range(len(x)):\n"
    tok = BPETokenizer.train([text * 30], 300, progress=False)
    run = tmp_path / "dec"
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, n_heads=2, n_layers=1)),
               run)
    tok.save(run)
    s = induction.demo_stage(run, tmp_path / "demo", budget="tiny")
    assert s["decoder"]["prompt"] in [p for p, _ in induction.DEMO_PROMPTS]
    assert (tmp_path / "demo" / "autopsy-decoder" / "report.html").exists()
    assert s["induction"]["formation_step"] is not None and len(s["induction"]["summary"]) == 3


# ------------------------------------------------------------------ ground truth at a CI budget
# The study's claims, checked on a run short enough for CI (seeded; the default budget's run is in the README):
# the first 900 of the default run's 1500 steps exactly (same data, init and lr schedule), 12 checkpoints,
# copy metrics only at the checkpoints. The induction heads form between checkpoints 485 and 900 here; at 750
# steps the detected set's ablation left 0.069, too close to the 0.076 limit to survive another torch build.
CI_RUN = dict(steps=900, schedule_steps=1500, checkpoints=12, eval_every=0)
# An untrained model of this shape scores ~0.04 on every head (uniform attention over ~16-32 keys): the
# test checks that, so this threshold is one a model without an induction head fails.
INDUCTION_THRESHOLD = 0.3


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("induction") / "run"
    induction.train(induction.InductionConfig(out=str(out), progress=False, **CI_RUN))
    return induction.analyse(out)


def test_ground_truth_the_detector_finds_induction_heads_that_an_untrained_model_lacks(ci_run):
    from glassmind.autopsy.causal import head_scores
    from glassmind.model import ModelConfig, Transformer

    cfg = induction.InductionConfig()
    torch.manual_seed(0)
    untrained = Transformer(ModelConfig(arch="decoder", vocab_size=cfg.vocab, context_length=2 * cfg.half,
                                        d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
                                        positional=cfg.positional)).eval()
    s = head_scores(untrained, half=cfg.half, n_seqs=32, vocab=range(1, cfg.vocab))
    assert max(max(row) for row in s["induction"]) < INDUCTION_THRESHOLD
    scores = ci_run["scores"]["induction"]
    detected = [tuple(int(x) for x in name[1:].split(".H")) for name in ci_run["induction_heads"]]
    assert ci_run["induction_head"]["score"] >= INDUCTION_THRESHOLD
    assert all(scores[l][h] >= INDUCTION_THRESHOLD for l, h in detected)
    # the circuit's other half: a previous-token head in the layer below
    assert ci_run["previous_token_head"]["layer"] < ci_run["induction_head"]["layer"]


def test_ground_truth_ablating_the_detected_induction_heads_drops_copying_to_chance_and_other_heads_do_not(ci_run):
    r = ci_run
    assert r["copy_accuracy"] >= 0.8  # the model copies
    assert r["copy_accuracy_without_induction_heads"] <= r["chance"] + induction.NEAR_CHANCE
    assert r["mechanism"] in ("one head", f"a set of {len(r['induction_heads'])} heads")  # the report says which
    other = r["random_other_head"]
    assert other["same_layer"] and other["layer"] == r["induction_head"]["layer"]  # same layer, outside the circuit
    assert other["copy_accuracy_without_it"] >= 0.8 * r["copy_accuracy"]
    assert len(r["random_other_set"]["heads"]) == len(r["induction_heads"])
    assert r["random_other_set"]["copy_accuracy_without_them"] >= 0.8 * r["copy_accuracy"]


def test_ground_truth_the_induction_head_forms_in_the_window_where_the_copy_loss_drops(ci_run):
    r = ci_run
    assert r["checkpoint_steps"] == induction.log_steps(CI_RUN["steps"], CI_RUN["checkpoints"])
    a, b = r["loss_drop_window"]
    assert a < b and a <= r["formation_step"] <= b
    # and the drop is a drop: the copy loss at the window's end is far below its start
    loss = {c["step"]: c["copy_loss"] for c in r["checkpoints"]}
    assert loss[b] < 0.7 * loss[a]
