"""Packed decode-time linears (glassmind/infer/fast_linear.py): the same numbers as the model's own F.linear,
never stale weights between generate calls, the model's modules untouched, and F.linear when torch's private
packed-GEMM ops are missing."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from glassmind.infer import Engine, SamplingParams
from glassmind.infer import fast_linear
from glassmind.infer.batch import DecoderBatch
from glassmind.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(dtype=torch.float32, **kw) -> Transformer:
    torch.manual_seed(kw.pop("seed", 0))
    base = dict(vocab_size=97, context_length=48, d_model=32, n_heads=4, n_layers=2, positional="rope",
                init_std=0.2)  # a wide init: logits of order 1, so a rounding slip would show
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval().to(dtype)


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [1, 2, 3], [40, 41, 42, 43, 44]]


@pytest.fixture(autouse=True)
def pack_short_calls(monkeypatch):
    """Tests generate a few tokens; let those calls pack as a long one would (see test_short_calls...)."""
    monkeypatch.setattr(fast_linear, "PACK_MIN_STEPS", 1)


@pytest.fixture
def fresh_probes():
    """The probes are cached per process; a test that hides an op must not leak its answer."""
    fast_linear.mkl_works.cache_clear()
    fast_linear.onednn_works.cache_clear()
    yield
    fast_linear.mkl_works.cache_clear()
    fast_linear.onednn_works.cache_clear()


def expected_kernel(dtype: torch.dtype, rows: int) -> str:
    if dtype == torch.float32 and rows >= fast_linear.MKL_MIN_ROWS and fast_linear.mkl_works():
        return "mkl"
    if dtype == torch.bfloat16 and fast_linear.onednn_works(torch.bfloat16):
        return "onednn"
    return "linear"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_f_linear_for_every_row_count(dtype):
    """Packed for 8 rows, called with 1..8 (sequences leave the batch) and with 3-D input; with and without
    a bias."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    for bias in (b, None):
        lin = fast_linear.PackedLinear(w, bias, rows=8)
        assert lin.kernel == expected_kernel(dtype, 8)
        for n in range(1, 9):
            x = torch.randn(n, 1, 64, generator=g).to(dtype)
            y, ref = lin(x), F.linear(x, w, bias)
            assert y.shape == ref.shape == (n, 1, 96) and y.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
            else:  # bf16 output rounding: one unit in the last place of |y| <= ~30
                torch.testing.assert_close(y.float(), ref.float(), atol=0.125, rtol=1e-2)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_decode_steps_through_the_view_equal_the_model(dtype, atol):
    """The engine's decode steps with packed weights against the plain model, on a left-padded batch of 5
    from which rows leave (5 -> 3 -> 2 rows: MKL's padded and F.linear paths)."""
    model = tiny(dtype)
    g = torch.Generator().manual_seed(1)
    fast = DecoderBatch(model, PROMPTS, room=12, decode_model=fast_linear.packed_decode(model, 12))
    plain = DecoderBatch(model, PROMPTS, room=12)
    with torch.inference_mode():
        a, b = fast.prefill(), plain.prefill()
        rows = len(PROMPTS)
        for keep in (None, None, None, [0, 2, 4], None, [2, 1], None):
            if keep is not None:
                fast.select(torch.tensor(keep))
                plain.select(torch.tensor(keep))
                rows = len(keep)
            tok = torch.randint(0, 97, (rows,), generator=g)
            a, b = fast.step(tok), plain.step(tok)
            assert a.abs().max() > 1  # logits of order 1: the tolerance is meaningful
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert plain.step_model is model
    if expected_kernel(dtype, 5) == "linear":  # nothing to pack on this build: no view
        assert fast.step_model is model
    else:
        assert fast.step_model.kernels() == {expected_kernel(dtype, 5): 2 * 6 + 1}  # q, k, v, out, up, down; head


def test_short_calls_and_unpackable_batches_do_not_pack(monkeypatch):
    monkeypatch.setattr(fast_linear, "PACK_MIN_STEPS", 32)
    model = tiny()
    assert not fast_linear.worth_packing(model, 5, 31)
    assert fast_linear.worth_packing(model, 5, 32) == (expected_kernel(torch.float32, 5) != "linear")
    assert not fast_linear.worth_packing(model, 1, 100)  # fp32, one row: F.linear is as fast
    batch = DecoderBatch(model, PROMPTS, room=8, decode_model=fast_linear.packed_decode(model, 8))
    with torch.inference_mode():
        batch.step(batch.prefill().argmax(-1))
    assert batch.step_model is model


def test_generate_packed_equals_plain_and_leaves_the_model_alone():
    model = tiny()
    before = [(name, type(m)) for name, m in model.named_modules()]
    params = SamplingParams(max_new_tokens=10, top_logprobs=3)
    fast, plain = Engine(model).generate(PROMPTS, params), Engine(model, packed=False).generate(PROMPTS, params)
    for x, y in zip(fast, plain):
        assert x.ids == y.ids
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
        assert [i for i, _ in x.top_logprobs[0]] == [i for i, _ in y.top_logprobs[0]]
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    view = fast_linear.DecodeView(model, 4)
    assert view.model is not model and view.model.decoder.blocks[0].ffn_norm.weight is \
        model.decoder.blocks[0].ffn_norm.weight                                       # shared, not copied
    assert view.head.weight.data_ptr() == model.token_embedding.weight.data_ptr()     # the tied head


def test_a_weight_change_between_generate_calls_is_seen():
    """An in-place update (a fused AdamW step does not even bump the version counters) between two calls
    of the same Engine: the second call decodes with the new weights."""
    model = tiny()
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=12)
    first = [r.ids for r in engine.generate(PROMPTS, params)]
    x = torch.tensor([PROMPTS[0] * 4])
    model.train()
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[0, 1:]).backward()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    opt.step()
    model.eval()
    second = [r.ids for r in engine.generate(PROMPTS, params)]
    assert second == [r.ids for r in Engine(model, packed=False).generate(PROMPTS, params)]
    assert second != first
    with torch.no_grad():  # and through .data, which bypasses version counters altogether
        for p in model.parameters():
            p.data.mul_(-1.0)
    third = [r.ids for r in engine.generate(PROMPTS, params)]
    assert third == [r.ids for r in Engine(model, packed=False).generate(PROMPTS, params)]
    assert third != second


def test_falls_back_to_f_linear_when_the_private_ops_are_missing(monkeypatch, fresh_probes):
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny(dtype)
        params = SamplingParams(max_new_tokens=8)
        monkeypatch.setattr(torch.ops, "mkl", types.SimpleNamespace())     # as if a future torch dropped them
        monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
        fast_linear.mkl_works.cache_clear()
        fast_linear.onednn_works.cache_clear()
        assert not fast_linear.mkl_works() and not fast_linear.onednn_works(dtype)
        assert fast_linear.DecodeView(model, 5).kernels() == {"linear": 13}
        fallback = [r.ids for r in Engine(model).generate(PROMPTS, params)]
        monkeypatch.undo()
        assert fallback == [r.ids for r in Engine(model, packed=False).generate(PROMPTS, params)]


def test_a_probe_that_disagrees_with_f_linear_disables_the_kernel(monkeypatch, fresh_probes):
    def wrong(x, packed, w, b, rows):
        return F.linear(x, w, b) + 1e-3

    monkeypatch.setattr(torch.ops, "mkl", types.SimpleNamespace(
        _mkl_reorder_linear_weight=lambda w, rows: w, _mkl_linear=wrong))
    assert not fast_linear.mkl_works()
    assert fast_linear.choose_kernel(torch.zeros(4, 4), 8) == "linear"


def test_observers_of_the_model_get_the_model(monkeypatch):
    """Hooks on a linear live on the model's own modules (the autopsy observes through them): with one, decode
    steps run the model, not a view."""
    monkeypatch.setattr(fast_linear, "PACK_MIN_STEPS", 1)
    model = tiny()
    seen = []
    model.decoder.blocks[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    batch = DecoderBatch(model, PROMPTS[:3], room=4, decode_model=fast_linear.packed_decode(model, 4))
    with torch.inference_mode():
        tok = batch.prefill().argmax(-1)
        batch.step(tok)
    assert batch.step_model is model and seen[-1] == 1                               # the decode step's query
    calls = []
    model.decoder.blocks[0].ffn.up.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    Engine(model).generate(PROMPTS[:3], SamplingParams(max_new_tokens=3))
    assert len(calls) == 3  # the prefill and two decode steps
    assert not fast_linear.can_view(nn.Linear(2, 2))
