"""Continuous batching (glassmind/infer/continuous.py): rows that join a running decode batch between steps,
and leave it, generate exactly what Engine.generate gives each prompt alone, with each row's own settings."""

from __future__ import annotations

import pytest
import torch

from glassmind.common import GlassmindError
from glassmind.infer import Engine, SamplingParams
from glassmind.infer.continuous import RowSampler, RunningBatch, choose
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
    samplers: list[RowSampler] = []
    pending: list[int] = []
    step = 0
    while True:
        new = [i for i, a in enumerate(arrivals) if a == step]
        if rows:
            logits = batch.step(torch.tensor(pending))
            picks = choose(logits, samplers)
            pending = []
            for r, c in enumerate(picks):
                out[rows[r]].append(c.token)
                lps[rows[r]].append(c.logprob)
                pending.append(c.token)
        if new:
            logits = batch.admit([reqs[i][0] for i in new])
            ss = [RowSampler(reqs[i][1], reqs[i][0], 97, torch.device("cpu")) for i in new]
            for i, c in zip(new, choose(logits, ss)):
                out[i].append(c.token)
                lps[i].append(c.logprob)
                pending.append(c.token)
            rows += new
            samplers += ss
        done = [r for r, i in enumerate(rows) if len(out[i]) >= max_new[i]]
        batch.remove(done)
        rows = [i for r, i in enumerate(rows) if r not in done]
        samplers = [s for r, s in enumerate(samplers) if r not in done]
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
    picks = choose(batch.admit(ps), ss)
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
