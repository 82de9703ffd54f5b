"""The product surface: the verb table, the README's promises, and the demo end to end (tiny budget)."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from glassmind.__main__ import VERBS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert re.search(rf"^  {re.escape(verb)}\s", out, re.M), verb


def test_every_verb_module_has_main_and_help():
    for verb, (module, _) in VERBS.items():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "main", None)), f"{module}.main"
        try:
            code = mod.main(["--help"])
        except SystemExit as e:  # argparse's --help
            code = e.code
        assert code == 0, verb


def test_unknown_verb_is_exit_2(capsys):
    assert main(["fly"]) == 2
    assert "unknown verb 'fly'" in capsys.readouterr().err


def test_readme_documents_every_verb_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for verb in VERBS:
        assert f"`{verb}" in readme or f"glassmind {verb}" in readme, f"README says nothing of {verb}"
    marker = readme.index("<!-- ci:test-command -->")
    command = readme[marker:].splitlines()[2]
    assert "pytest" in command and "pip install torch==2.13.0 &&" in command
    assert "ci:test-command" in (ROOT / ".ci" / "run").read_text()


def test_demo_runs_every_stage(tmp_path):
    """`glassmind demo --budget tiny`: every stage runs and leaves its run directory and summary."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "glassmind", "demo", "--out", str(out), "--budget", "tiny",
                           "--corpus-mb", "0.5", "--vocab-size", "400"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"tokenizers", "pretrain", "generate", "align", "autopsy", "evals"}
    for run in ("tokenizer-bpe", "tokenizer-wordpiece", "pretrain-decoder", "pretrain-encoder",
                "pretrain-encoder-decoder", "align/sft", "align/reward", "align/ppo", "align/dpo",
                "autopsy/autopsy-decoder", "autopsy/induction"):
        assert (out / run).is_dir(), run
    for arch in ("decoder", "encoder", "encoder-decoder"):
        r = summary["pretrain"][arch]
        assert r["val_loss_after"] < r["val_loss_before"], arch
    assert "Results are in" in proc.stdout
    assert (out / "autopsy" / "autopsy-decoder" / "report.html").is_file()
    assert (out / "align" / "dpo" / "report" / "index.html").is_file() and "report card" in proc.stdout
    life = json.loads((out / "align" / "dpo" / "evals" / "calibration-lifecycle" / "result.json").read_text())
    assert [life["numbers"][f"prompting, {s}"] for s in ("pretrain-decoder", "sft", "ppo", "dpo")] == \
        ["3-shot", "chat", "chat", "chat"]
    assert "glassmind serve " in proc.stdout and str(out / "align" / "sft") in proc.stdout
