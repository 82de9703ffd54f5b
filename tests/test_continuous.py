"""Continuous batching (glassmind/infer/continuous.py): rows that join a running decode batch between steps,
and leave it, generate exactly what Engine.generate gives each prompt alone, with each row's own settings."""

from __future__ import annotations

import pytest
import torch

from glassmind.common import GlassmindError
from glassmind.infer import Engine, SamplingParams
from glassmind.infer.continuous import BatchSampler, RowSampler, RunningBatch
from glassmind.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> Transformer:
    torch.manual_seed(kw.pop("seed", 0))
    base = dict(vocab_size=97, context_length=40, d_model=32, n_heads=4, n_layers=2)
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()


def prompts(n, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run_staggered(model, reqs, arrivals, max_new):
    """Drive a RunningBatch as the scheduler does: request i joins at step arrivals[i], leaves after
    max_new[i] tokens. Returns each request's tokens and logprobs."""
    batch = RunningBatch(model)
    out = {i: [] for i in range(len(reqs))}
    lps = {i: [] for i in range(len(reqs))}
    rows: list[int] = []            # request index per row
    sampler = BatchSampler(97, torch.device("cpu"))
    pending: list[int] = []
    step = 0
    while True:
        new = [i for i, a in enumerate(arrivals) if a == step]
        if rows:
            logits = batch.step(torch.tensor(pending))
            picks = sampler.choose(logits)
            pending = []
            for r, c in enumerate(picks):
                out[rows[r]].append(c.token)
                lps[rows[r]].append(c.logprob)
                pending.append(c.token)
        if new:
            logits = batch.admit([reqs[i][0] for i in new])
            ss = BatchSampler.of([RowSampler(reqs[i][1], reqs[i][0], 97, torch.device("cpu"), max_new=max_new[i])
                                  for i in new], 97, torch.device("cpu"))
            for i, c in zip(new, ss.choose(logits)):
                out[i].append(c.token)
                lps[i].append(c.logprob)
                pending.append(c.token)
            rows += new
            sampler.append(ss)
        done = [r for r, i in enumerate(rows) if len(out[i]) >= max_new[i]]
        batch.remove(done)
        rows = [i for r, i in enumerate(rows) if r not in done]
        sampler.remove(done)
        pending = [t for r, t in enumerate(pending) if r not in done]
        step += 1
        if not rows and step > max(arrivals):
            return out, lps


@pytest.mark.parametrize("kw", [dict(positional="learned"), dict(positional="rope", n_kv_heads=2)])
def test_rows_joining_and_leaving_a_running_batch_generate_what_each_prompt_generates_alone(kw):
    model = tiny(**kw)
    ps = prompts(8, 2, 14)
    settings = [SamplingParams(max_new_tokens=1),  # greedy
                SamplingParams(strategy="sample", seed=3, temperature=0.8),
                SamplingParams(strategy="sample", seed=11, top_k=5),
                SamplingParams(strategy="sample", seed=5, top_p=0.7, repetition_penalty=1.3),
                SamplingParams(repetition_penalty=1.5),
                SamplingParams(strategy="sample", seed=2, min_p=0.1),
                SamplingParams(strategy="sample", temperature=0, seed=9),
                SamplingParams(strategy="sample", seed=4, temperature=0.8)]   # row 1's settings, another seed
    # long prompts joining late force the running rows to move right; 24 steps in a 40-slot cache of rows
    # that keep joining force the cut of unused leading columns
    arrivals = [0, 0, 3, 5, 6, 12, 13, 0]
    max_new = [20, 15, 9, 25, 12, 14, 26, 18]
    reqs = list(zip(ps, settings))
    got, got_lp = run_staggered(model, reqs, arrivals, max_new)
    engine = Engine(model, packed=False)
    for i, (p, s) in enumerate(reqs):
        s.max_new_tokens = max_new[i]
        [r] = engine.generate([p], s)
        assert got[i] == r.ids, f"request {i}"
        assert got_lp[i] == pytest.approx(r.logprobs, abs=1e-4)


def test_top_logprobs_per_row_match_the_engine():
    model = tiny()
    ps = prompts(2, 3, 6, seed=1)
    batch = RunningBatch(model)
    ss = [RowSampler(SamplingParams(top_logprobs=3), ps[0], 97, torch.device("cpu")),
          RowSampler(SamplingParams(top_logprobs=0), ps[1], 97, torch.device("cpu"))]
    picks = BatchSampler.of(ss, 97, torch.device("cpu")).choose(batch.admit(ps))
    [r] = Engine(model).generate([ps[0]], SamplingParams(max_new_tokens=1, top_logprobs=3))
    assert [t for t, _ in picks[0].top_logprobs] == [t for t, _ in r.top_logprobs[0]]
    assert picks[1].top_logprobs == []


def test_a_prompt_that_leaves_no_room_is_refused_and_the_batch_is_unchanged():
    model = tiny()
    batch = RunningBatch(model)
    batch.admit([[1, 2, 3]])
    with pytest.raises(GlassmindError, match="does not fit"):
        batch.admit([list(range(40))])
    assert batch.size == 1
    batch.remove([0])
    assert batch.size == 0 and batch.col == 0


def test_one_batched_pass_filters_every_row_as_sampling_process_filters_it_alone():
    """BatchSampler.process applies each row's own settings with batched tensor ops; row by row it must give
    sampling.process (itself pinned to transformers' warpers in test_sampling.py) for that row alone."""
    from glassmind.infer.sampling import process

    V, cpu = 97, torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, V, generator=g) * 1.5
    settings = [SamplingParams(strategy="sample", temperature=0.7),
                SamplingParams(),                                               # greedy: not among the scores
                SamplingParams(strategy="sample", top_k=5),
                SamplingParams(strategy="sample", top_p=0.6, temperature=1.3),
                SamplingParams(strategy="sample", min_p=0.2, top_k=20),
                SamplingParams(strategy="sample", repetition_penalty=1.5, top_p=0.9, min_p=0.05),
                SamplingParams(repetition_penalty=2.0),                         # greedy with a penalty
                SamplingParams(strategy="sample", top_k=3, top_p=0.5, min_p=0.3, temperature=0.5)]
    prompts_ = [torch.randint(0, V, (6,), generator=g).tolist() for _ in settings]
    b = BatchSampler.of([RowSampler(p, q, V, cpu) for p, q in zip(settings, prompts_)], V, cpu)
    x, s = b.process(logits)
    sampled = [r for r, p in enumerate(settings) if not p.is_greedy]
    assert b.sampled.tolist() == sampled
    for j, r in enumerate(sampled + [1, 6]):
        p = settings[r]
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(1, V, dtype=torch.bool)
            seen[0, prompts_[r]] = True
        ref = process(logits[r: r + 1], p, seen)[0]
        got = s[j] if j < len(sampled) else x[r]
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), f"row {r}: another set of tokens kept"
        kept = ~torch.isinf(ref)
        assert torch.allclose(got[kept], ref[kept], rtol=1e-6, atol=1e-6), f"row {r}"
    kept = (~torch.isinf(s)).sum(-1).tolist()
    assert kept[0] == V and all(1 <= k < V for k in kept[1:]), kept   # every filter bit, none emptied a row


def test_a_rows_kth_token_is_the_inverse_cdf_of_its_kth_seeded_uniform_worked_in_numpy():
    """The draw, pinned outside the code under test: row r's k-th sampled token is the first token whose
    cumulative probability (numpy, float64) exceeds u_k, where u_0, u_1, ... are torch.rand draws from a
    generator seeded with the row's seed (plus its offset: sequence i of a call uses seed + i)."""
    import numpy as np

    from glassmind.infer.sampling import process

    V, cpu = 97, torch.device("cpu")
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(strategy="sample", temperature=1.5, top_k=40, seed=21)
    b = BatchSampler.of([RowSampler(SamplingParams(), [1], V, cpu),            # a greedy row beside it
                         RowSampler(params, [1], V, cpu, seed_offset=2, max_new=30)], V, cpu)
    got = [b.choose(logits.expand(2, V))[1].token for _ in range(30)]
    probs = torch.softmax(process(logits, params)[0].double(), -1).numpy()
    cdf = np.cumsum(probs)
    u = torch.rand(30, generator=torch.Generator().manual_seed(23)).double().numpy()
    want = [int(np.searchsorted(cdf, x * cdf[-1], side="right")) for x in u]
    assert got == want
    assert len(set(got)) > 5                                                   # it did sample


def test_packed_decode_steps_give_the_eager_steps_logits_as_rows_join_and_leave():
    """RunningBatch(packed=True) (the server's default) runs decode steps through fast_linear's DecodeView,
    one per power-of-two batch size: the logits are the eager model's to float rounding."""
    from glassmind.infer import fast_linear

    model = tiny()
    eager, packed = RunningBatch(model), RunningBatch(model, packed=True)
    ps = prompts(6, 2, 9, seed=3)
    toks = None
    for step in range(12):
        if step in (0, 4):                          # 3 rows, then 3 more join (buckets 4 and 8)
            new = [b.admit(ps[:3] if step == 0 else ps[3:]) for b in (eager, packed)]
            assert torch.allclose(new[0], new[1], atol=1e-5)
            t = new[0].argmax(-1)
            toks = t if toks is None else torch.cat([toks, t])
        if step == 8:                               # two rows leave (bucket 4 again)
            for b in (eager, packed):
                b.remove([0, 4])
            toks = toks[[1, 2, 3, 5]]
        a, b = eager.step(toks), packed.step(toks)
        assert torch.allclose(a, b, atol=1e-4), f"step {step}"
        toks = a.argmax(-1)
    if fast_linear.mkl_works():   # fp32 packs from 3 rows on: the steps above did run the views
        assert {4, 8} <= {k for k, v in packed._views.items() if isinstance(v, fast_linear.DecodeView)}
