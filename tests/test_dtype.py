"""`--dtype auto`: bf16 only where the machine computes it natively, fp32 elsewhere (issue 13).

The machine's own answer is never what these tests check: each injects the capability facts, the timed
probe or the verdict, so the same claims hold on an AMX Xeon, an AVX2 laptop and a CI runner.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from glassmind import common
from glassmind.common import Bf16Support, CpuFacts, GlassmindError, judge_bf16, resolve_dtype

NOT_NATIVE = Bf16Support(False, "this CPU (AVX2) has no native bf16", slowdown=5.5)
NATIVE = Bf16Support(True, "this CPU (AVX512, AMX) computes bf16 natively")

AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})


def never_timed() -> float:
    raise AssertionError("the capability alone decides here: the timed probe must not run")


# ----------------------------------------------------------------------------------------------------
# resolve_dtype with the verdict injected


def test_auto_picks_fp32_on_a_cpu_whose_probe_says_bf16_is_not_native():
    dtype, reason = resolve_dtype("auto", "cpu", probe=lambda: NOT_NATIVE, announce=False)
    assert dtype == torch.float32
    assert reason == "dtype auto -> fp32: this CPU (AVX2) has no native bf16"


def test_auto_picks_bf16_on_a_cpu_whose_probe_says_bf16_is_native():
    dtype, reason = resolve_dtype("auto", "cpu", probe=lambda: NATIVE, announce=False)
    assert dtype == torch.bfloat16
    assert reason.startswith("dtype auto -> bf16: ")


def test_auto_is_announced_once_per_process(capsys, monkeypatch):
    monkeypatch.setattr(common, "_announced", set())
    for _ in range(3):
        resolve_dtype("auto", "cpu", probe=lambda: NOT_NATIVE)
    assert capsys.readouterr().err.count("dtype auto -> fp32") == 1


def test_explicit_bf16_on_a_slow_cpu_still_runs_bf16_but_warns_how_much_slower(capsys, monkeypatch):
    monkeypatch.setattr(common, "_announced", set())
    dtype, reason = resolve_dtype("bf16", "cpu", probe=lambda: NOT_NATIVE)
    assert dtype == torch.bfloat16
    err = capsys.readouterr().err
    assert "warning: --dtype bf16" in err and "5.5x as long as an fp32 one" in err and "--dtype auto" in err
    assert "5.5x slower" in reason


def test_explicit_bf16_on_a_native_cpu_and_explicit_fp32_say_nothing(capsys, monkeypatch):
    monkeypatch.setattr(common, "_announced", set())
    assert resolve_dtype("bf16", "cpu", probe=lambda: NATIVE)[0] == torch.bfloat16
    assert resolve_dtype("fp32", "cpu", probe=lambda: NOT_NATIVE)[0] == torch.float32
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_unknown_dtype_is_a_user_error_naming_the_choices():
    with pytest.raises(GlassmindError, match="auto, fp32, bf16, fp16"):
        resolve_dtype("int8", "cpu", probe=lambda: NATIVE, announce=False)


# ----------------------------------------------------------------------------------------------------
# the capability verdict, with made-up CPUs


def facts(capability="AVX512", mkldnn_bf16=True, flags=AMX):
    return CpuFacts(model="test CPU", capability=capability, mkldnn_bf16=mkldnn_bf16, flags=flags)


def test_an_amx_cpu_is_native_without_timing():
    s = judge_bf16(facts(), timer=never_timed)
    assert s.native and "AMX" in s.why and s.slowdown is None


def test_an_avx2_cpu_is_not_native_without_timing():
    s = judge_bf16(facts(capability="AVX2", mkldnn_bf16=False, flags=AVX2), timer=never_timed)
    assert not s.native and s.why == "this CPU (AVX2) has no native bf16"
    # oneDNN claiming bf16 kernels (it emulates them on AVX-512 without BF16) does not make it native
    assert not judge_bf16(facts(capability="AVX512", flags=AVX2 | {"avx512f"}), timer=never_timed).native


@pytest.mark.parametrize("ratio, native", [(6.5, False), (1.0, False), (0.2, True)])
def test_ambiguous_capability_is_settled_by_the_timed_probe(ratio, native):
    calls = []

    def timer():
        calls.append(1)
        return ratio

    # the hardware has AMX, but torch runs its AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, a VM hiding AVX-512)
    s = judge_bf16(facts(capability="AVX2"), timer=timer)
    assert calls == [1] and s.native is native and s.slowdown == ratio
    # /proc/cpuinfo unreadable (macOS, Windows): the probe decides too
    assert judge_bf16(facts(flags=None), timer=timer).native is native and calls == [1, 1]


def test_the_timed_probe_returns_a_ratio_of_two_real_products():
    ratio = common.time_bf16_vs_fp32(n=32, repeats=1)
    assert 0 < ratio < float("inf")


def test_cpu_summary_names_the_cpu_and_torchs_kernel_level():
    s = common.cpu_summary()
    f = common.cpu_facts()
    assert s.startswith(f.model) and torch.backends.cpu.get_cpu_capability() in s
    assert ("no native bf16" in s) != common.cpu_bf16_support().native


# ----------------------------------------------------------------------------------------------------
# a run records what auto chose


@pytest.fixture
def tiny_ws(tmp_path, monkeypatch):
    from glassmind.tokenizer.bpe import BPETokenizer

    text = "the model reads every token and predicts the next one while the loss falls. " * 400
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": text[i:i + 800]}) + "\n"
                                                 for i in range(0, len(text), 800)))
    BPETokenizer([], special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield tmp_path
    torch.set_num_threads(threads)
    torch._C._set_deterministic_algorithms(det, warn_only=torch.is_deterministic_algorithms_warn_only_enabled())


def tiny_config(out, **kw):
    from glassmind.recipes.pretrain import PretrainConfig

    return PretrainConfig(out=str(out), **{**dict(
        arch="decoder", data=["data.jsonl"], tokenizer="tok", shards_dir="shards", d_model=32, n_heads=2,
        n_layers=1, context=16, micro_batch=2, batch_tokens=32, steps=2, eval_every=0, eval_batches=1,
        ckpt_every=0, keep_last=1, peak_flops=1e10, val_fraction=0.1, progress=False, threads=1, device="cpu"),
        **kw})


@pytest.mark.parametrize("support, want", [(NOT_NATIVE, "fp32"), (NATIVE, "bf16")])
def test_a_pretrain_run_records_the_dtype_auto_chose_and_why(tiny_ws, monkeypatch, support, want):
    from glassmind.recipes.pretrain import pretrain

    monkeypatch.setattr(common, "cpu_bf16_support", lambda: support)
    summary = pretrain(tiny_config("run"))
    saved = json.loads((tiny_ws / "run" / "pretrain.json").read_text())
    assert saved["dtype"] == want == summary["dtype"]
    assert saved["dtype_reason"] == f"dtype auto -> {want}: {support.why}"
    card = (tiny_ws / "run" / "card.md").read_text()
    assert f"{want} on cpu (dtype auto -> {want}" in card


def test_a_resumed_auto_run_keeps_the_dtype_it_started_with(tiny_ws, monkeypatch):
    """The same run resumed on a machine where auto would choose otherwise continues in its own dtype."""
    from glassmind.recipes.pretrain import pretrain

    monkeypatch.setattr(common, "cpu_bf16_support", lambda: NATIVE)
    pretrain(tiny_config("run", ckpt_every=2))
    monkeypatch.setattr(common, "cpu_bf16_support", lambda: NOT_NATIVE)
    summary = pretrain(tiny_config("run", ckpt_every=2, steps=3, resume=True))
    assert summary["dtype"] == "bf16" and summary["steps"] == 3
    assert json.loads((tiny_ws / "run" / "pretrain.json").read_text())["dtype"] == "bf16"


# ----------------------------------------------------------------------------------------------------
# the demo's tiny budget in either dtype


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_demo_pretraining_tiny_budget_passes_in_either_dtype(tiny_ws, dtype):
    from glassmind.tokenizer.bpe import BPETokenizer
    from glassmind.demo import pretrain_stage as demo_stage

    tok = BPETokenizer.train(["def __init__(self, value):\n    return value\n" * 50], 280, pattern="gpt4")
    tok.save(tiny_ws / "bpe")
    results = demo_stage(tiny_ws / "demo", tiny_ws / "bpe", budget="tiny", dtype=dtype)
    for arch in ("decoder", "encoder", "encoder-decoder"):
        r = results[arch]
        assert r["dtype"] == dtype, arch
        assert r["val_loss_after"] < r["val_loss_before"], arch
        assert json.loads((tiny_ws / "demo" / f"pretrain-{arch}" / "pretrain.json").read_text())["dtype"] == dtype


# ----------------------------------------------------------------------------------------------------
# fast paths tuned on an AMX CPU check the capability


def test_packed_bf16_decode_kernels_only_where_bf16_is_native(monkeypatch):
    from glassmind.infer import fast_linear

    w = torch.randn(64, 32).bfloat16()
    monkeypatch.setattr(fast_linear, "cpu_bf16_support", lambda: NOT_NATIVE)
    assert fast_linear.choose_kernel(w, 8) == "linear"
    monkeypatch.setattr(fast_linear, "cpu_bf16_support", lambda: NATIVE)
    if not fast_linear.onednn_works(torch.bfloat16):
        pytest.skip("this torch/CPU has no working oneDNN packed bf16 linear")
    assert fast_linear.choose_kernel(w, 8) == "onednn"
    assert fast_linear.choose_kernel(w.float(), 8) == "mkl" or not fast_linear.mkl_works()  # fp32 unchanged


def test_compiled_bf16_step_autotunes_amx_kernels_only_on_an_amx_cpu(monkeypatch):
    from glassmind.infer import compiled

    model = torch.nn.Linear(4, 4)
    monkeypatch.setattr(compiled, "cpu_has_amx_bf16", lambda: True)
    assert compiled.compile_options(model.bfloat16()).get("max_autotune") is True
    assert "max_autotune" not in compiled.compile_options(model.float())  # fp32: the shorter compile, measured
    monkeypatch.setattr(compiled, "cpu_has_amx_bf16", lambda: False)
    options = compiled.compile_options(model.bfloat16())
    assert "max_autotune" not in options and options["freezing"] and options["cpp_wrapper"]


def test_cpu_has_amx_bf16_needs_the_flag_and_native_bf16(monkeypatch):
    monkeypatch.setattr(common, "cpu_facts", lambda: facts())
    monkeypatch.setattr(common, "cpu_bf16_support", lambda: NATIVE)
    assert common.cpu_has_amx_bf16()
    monkeypatch.setattr(common, "cpu_bf16_support", lambda: NOT_NATIVE)  # AMX hidden (ONEDNN_MAX_CPU_ISA)
    assert not common.cpu_has_amx_bf16()
    monkeypatch.setattr(common, "cpu_bf16_support", lambda: NATIVE)
    monkeypatch.setattr(common, "cpu_facts", lambda: facts(flags=AMX - {"amx_bf16", "amx_tile"}))  # AVX512-BF16
    assert not common.cpu_has_amx_bf16()


@pytest.mark.parametrize("support, want", [(NOT_NATIVE, torch.float32), (NATIVE, torch.bfloat16)])
def test_generate_and_chat_default_to_auto_and_load_the_model_in_its_dtype(tmp_path, monkeypatch, support, want):
    from glassmind.infer.chat import ChatConfig
    from glassmind.infer.generate import GenerateConfig, load_run
    from glassmind.model import ModelConfig, Transformer, save_model
    from glassmind.tokenizer.bpe import BPETokenizer

    assert GenerateConfig().dtype == ChatConfig().dtype == "auto"
    BPETokenizer([], special_tokens=["<|endoftext|>"]).save(tmp_path)
    save_model(Transformer(ModelConfig(vocab_size=257, context_length=16, d_model=16, n_heads=2, n_layers=1)), tmp_path)
    monkeypatch.setattr(common, "cpu_bf16_support", lambda: support)
    model, _ = load_run(tmp_path, device="cpu", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {want}
