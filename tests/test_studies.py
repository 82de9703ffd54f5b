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
    assert not out.exists()


def test_architectures_study_tiny(tmp_path):
    out = tmp_path / "arch"
    assert main(["study", "architectures", "--budget", "tiny", "--out", str(out), "--workers", "2"]) == 0
    rows = {r["model"]: r for r in csv.DictReader(open(out / "points.csv"))}
    assert set(rows) == {"transformer", "rnn", "lstm", "gru"}
    # parameter-matched within 2% of the Transformer
    t = int(rows["transformer"]["params_nonemb"])
    for m in ("rnn", "lstm", "gru"):
        assert abs(int(rows[m]["params_nonemb"]) - t) / t < 0.05
    assert len([k for k in rows["lstm"] if k.startswith("loss_pos")]) == 16
    thr = list(csv.DictReader(open(out / "throughput.csv")))
    assert {r["model"] for r in thr} == set(rows) and all(float(r["tokens_per_s"]) > 0 for r in thr)
    assert "per-position" in (out / "card.md").read_text() or "loss at pos" in (out / "card.md").read_text()
    assert main(["study", "architectures", "--models", "transformer,cnn", "--out", str(tmp_path / "x")]) == 2
