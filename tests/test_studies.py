"""The studies at their tiny budgets: they run end to end through the recipes, write their CSV, plots and card,
resume without redoing finished points, and refuse impossible grids before training."""

import csv
import json

import pytest

from glassmind.__main__ import main


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling") / "study"
    assert main(["study", "scaling", "--budget", "tiny", "--out", str(out), "--workers", "2", "--bootstrap", "5"]) == 0
    return out


def test_scaling_study_writes_points_card_plot_and_a_prediction_made_before_training(scaling_run):
    rows = list(csv.DictReader(open(scaling_run / "points.csv")))
    assert len(rows) == 7  # 3 sizes x 2 budgets + the predicted run
    for r in rows:  # FLOP-matched: each run's actual FLOPs within one step of its budget
        assert abs(float(r["C"]) - float(r["C_target"])) <= float(r["flops_per_token"]) * 256
        assert int(r["N_total"]) > int(r["N_nonemb"]) > 0
    pred = json.loads((scaling_run / "prediction.json").read_text())
    assert "measured" not in pred  # written before the larger run existed, never rewritten
    run_started = (scaling_run / "runs" / pred["point"]["name"] / "pretrain.json").stat().st_mtime
    assert (scaling_run / "prediction.json").stat().st_mtime <= run_started
    scored = json.loads((scaling_run / "prediction_scored.json").read_text())
    assert scored["measured"] == pytest.approx(float(rows[-1]["val_loss"]))
    card = (scaling_run / "card.md").read_text()
    assert "Pre-registered prediction" in card and "glassmind study scaling --budget tiny" in card
    assert (scaling_run / "scaling.png").stat().st_size > 10_000
    assert (scaling_run / "command.txt").read_text().startswith("glassmind study scaling")


def test_scaling_study_resumes_without_redoing_finished_points(scaling_run, capsys):
    points = sorted((scaling_run / "points").glob("*.json"))
    lost = points[0]
    lost.unlink()  # as if the study were killed before this point finished
    before = {p: p.stat().st_mtime_ns for p in points[1:]}
    assert main(["study", "scaling", "--budget", "tiny", "--out", str(scaling_run), "--workers", "1",
                 "--bootstrap", "5"]) == 0
    assert "1 to run" in capsys.readouterr().out
    assert lost.exists()
    assert {p: p.stat().st_mtime_ns for p in points[1:]} == before


def test_scaling_study_refuses_an_impossible_grid_before_training(tmp_path, capsys):
    out = tmp_path / "nope"
    assert main(["study", "scaling", "--budget", "tiny", "--out", str(out), "--flops", "1e6,1e9"]) == 2
    err = capsys.readouterr().err
    assert "gets 0 steps" in err or "an IsoFLOP parabola needs 3" in err
    assert "raise that --flops level" in err or "add sizes" in err
    # one level of 3 sizes: a parabola, but too few runs for Approach 3's 5 parameters
    assert main(["study", "scaling", "--budget", "tiny", "--out", str(out), "--flops", "2e9"]) == 2
    assert "Approach 3 fits 5 parameters and needs at least 5" in capsys.readouterr().err
    assert not out.exists()


def test_architectures_study_tiny(tmp_path):
    out = tmp_path / "arch"
    assert main(["study", "architectures", "--budget", "tiny", "--out", str(out), "--workers", "2"]) == 0
    rows = {r["model"]: r for r in csv.DictReader(open(out / "points.csv"))}
    assert set(rows) == {"transformer", "rnn", "lstm", "gru", "seq2seq"}  # seq2seq: the recall task only
    # parameter-matched within 2% of the Transformer
    t = int(rows["transformer"]["params_nonemb"])
    for m in ("rnn", "lstm", "gru"):
        assert abs(int(rows[m]["params_nonemb"]) - t) / t < 0.05
    assert len([k for k in rows["lstm"] if k.startswith("loss_pos")]) == 16
    thr = list(csv.DictReader(open(out / "throughput.csv")))
    assert {r["model"] for r in thr} == set(rows) - {"seq2seq"} and all(float(r["tokens_per_s"]) > 0 for r in thr)
    assert "per-position" in (out / "card.md").read_text() or "loss at pos" in (out / "card.md").read_text()
    # the recall task: every model, the seq2seq too, at every distance, in the CSV and the card
    rec = list(csv.DictReader(open(out / "recall.csv")))
    assert {(r["model"], r["distance"]) for r in rec} == {(m, d) for m in ("transformer", "rnn", "lstm", "gru", "seq2seq")
                                                         for d in ("0", "8")}
    s2s = next(r for r in rec if r["model"] == "seq2seq")
    assert abs(int(s2s["params_nonemb"]) - t) / t < 0.05
    assert "recall_d8" in rows["gru"]
    assert "Long-range key-value recall" in (out / "card.md").read_text()
    assert main(["study", "architectures", "--models", "transformer,cnn", "--out", str(tmp_path / "x")]) == 2


@pytest.fixture(scope="module")
def emergence_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("emergence") / "study"
    assert main(["study", "emergence", "--budget", "tiny", "--out", str(out), "--workers", "2"]) == 0
    return out


def test_emergence_study_scores_every_checkpoint_on_the_same_problems_and_derives_its_verdict(emergence_run):
    from glassmind.studies.emergence import jump_verdict

    rows = list(csv.DictReader(open(emergence_run / "points.csv")))
    # 3 sizes x 2 checkpoints x 2 operand lengths, every one on 40 problems
    assert len(rows) == 12 and {r["n"] for r in rows} == {"40"}
    assert {(r["size"], r["step"], r["k"]) for r in rows} == {(s, st, k) for s in ("d16x1", "d24x1", "d32x1")
                                                             for st in ("12", "24") for k in ("2", "3")}
    for r in rows:
        assert 0 <= float(r["em_lo"]) <= float(r["exact_match"]) <= float(r["em_hi"]) <= 1
        assert float(r["predicted_em"]) == pytest.approx(float(r["per_digit"]) ** int(r["L"]))
        assert float(r["log_likelihood"]) < 0 and 0 < float(r["brier"]) < 2
    card = (emergence_run / "card.md").read_text()
    # the card's verdict is the one the CSV's numbers give
    keys = ("exact_match", "per_digit", "edit_distance", "log_likelihood", "brier")
    for k in ("2", "3"):
        ladder = sorted((r for r in rows if r["k"] == k and r["step"] == "24"), key=lambda r: int(r["N_total"]))
        v = jump_verdict([{key: float(r[key]) for key in keys} for r in ladder])
        assert f"- across sizes, k = {k}: {v['text']}." in card
    assert "glassmind study emergence --budget tiny" in card
    assert (emergence_run / "emergence.png").stat().st_size > 20_000


def test_emergence_study_refuses_an_impossible_ladder_before_training(tmp_path, capsys):
    out = tmp_path / "nope"
    assert main(["study", "emergence", "--budget", "tiny", "--out", str(out), "--context", "16", "--digits", "2,4"]) == 2
    err = capsys.readouterr().err
    assert "cannot hold one" in err and "--context 17" in err
    assert main(["study", "emergence", "--budget", "tiny", "--out", str(out), "--digits", "1"]) == 2
    assert "only about 10 1-digit problems are held out" in capsys.readouterr().err
    assert not out.exists()
