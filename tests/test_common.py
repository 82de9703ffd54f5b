"""glassmind.common: atomic writes, flags from config dataclasses, dtype names, rank helpers."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Optional

import pytest

from glassmind import common
from glassmind.common import GlassmindError


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    common.atomic_write_json(target, {"x": 1})
    common.atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["a.json"]


def test_atomic_path_failure_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "w.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with common.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["w.bin"]


def test_read_jsonl_ignores_a_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    common.append_jsonl(p, {"step": 1})
    with open(p, "a") as f:
        f.write('{"step": 2, "lo')
    assert common.read_jsonl(p) == [{"step": 1}]


@dataclass
class Cfg:
    steps: int = field(default=3, metadata={"help": "how many"})
    seed: int | None = None
    old_style: Optional[float] = None
    name: str = field(default="a", metadata={"choices": ["a", "b"]})
    flag: bool = False
    files: list[str] = field(default_factory=list)


def test_config_flags_have_the_field_types():
    p = argparse.ArgumentParser()
    common.add_config_args(p, Cfg)
    ns = p.parse_args(["--steps", "5", "--seed", "0", "--old-style", "0.5", "--flag", "--files", "x", "y"])
    cfg = common.config_from_args(Cfg, ns)
    assert cfg == Cfg(steps=5, seed=0, old_style=0.5, name="a", flag=True, files=["x", "y"])
    assert common.config_from_args(Cfg, p.parse_args(["--no-flag"])).flag is False
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "c"])


def test_dtype_names_and_errors():
    import torch

    assert common.parse_dtype("bf16") is torch.bfloat16 and common.parse_dtype(torch.float16) is torch.float16
    with pytest.raises(GlassmindError, match="fp32, bf16, fp16"):
        common.parse_dtype("fp8")


def test_run_main_turns_user_errors_into_exit_2(capsys):
    def body(argv):
        raise GlassmindError("bad thing: do this instead")

    assert common.run_main(body, []) == 2
    assert "bad thing: do this instead" in capsys.readouterr().err


def test_single_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert common.rank() == 0 and common.world_size() == 1 and common.is_rank0()
