"""The inference engine: cache equivalence, batching, every strategy, parity with transformers' generate,
streaming, detokenization, metrics, argument checks, fill-mask, and the generate/chat verbs."""

from __future__ import annotations

import io
import math
import os
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from glassmind.common import GlassmindError
from glassmind.infer import Detokenizer, Engine, SamplingParams
from glassmind.infer.batch import DecoderBatch, Seq2SeqBatch
from glassmind.infer.engine import FlopCounter
from glassmind.infer.kv_cache import KVCache
from glassmind.model import ModelConfig, Transformer, save_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run best on one thread


def tiny(**kw) -> Transformer:
    torch.manual_seed(kw.pop("seed", 0))
    base = dict(vocab_size=97, context_length=48, d_model=32, n_heads=4, n_layers=2)
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()

def train_bpe(text: str, vocab_size: int):
    """A small byte-level BPE on `text`; it may stop short of vocab_size (a warning we do not need here)."""
    import warnings

    bpe = pytest.importorskip("glassmind.tokenizer.bpe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bpe.BPETokenizer.train([text], vocab_size, progress=False)



def random_prompts(n: int, lo: int, hi: int, vocab: int = 97, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]


# ------------------------------------------------------------------------------ cached == uncached


@pytest.mark.parametrize("kw", [dict(positional="learned"), dict(positional="rope", n_kv_heads=2),
                                dict(positional="sinusoidal", norm_position="post")])
def test_cached_decode_equals_full_recompute_at_every_step(kw):
    model = tiny(**kw)
    g = torch.Generator().manual_seed(1)
    for prompt in random_prompts(3, 1, 15, seed=2):
        batch = DecoderBatch(model, [prompt], room=10)
        seq = list(prompt)
        with torch.no_grad():
            logits = batch.prefill()
            for _ in range(10):
                full = model(torch.tensor([seq]))[:, -1]
                torch.testing.assert_close(logits, full, atol=ATOL, rtol=0)
                tok = torch.randint(0, 97, (1,), generator=g)
                seq.append(int(tok))
                logits = batch.step(tok)


@pytest.mark.parametrize("positional", ["rope", "learned", "sinusoidal"])
def test_left_padded_batch_of_8_equals_each_prompt_alone(positional):
    """Left padding shifts each row's positions: learned and sinusoidal tables must be read at the row's own
    positions (0 at its first real token), as rope's rotation is."""
    model = tiny(positional=positional)
    prompts = random_prompts(8, 1, 14, seed=3)
    assert len({len(p) for p in prompts}) > 1
    g = torch.Generator().manual_seed(4)
    batch = DecoderBatch(model, prompts, room=8)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        logits = batch.prefill()                                                       # (8, V)
        for _ in range(8):
            for i, s in enumerate(seqs):  # each row against itself alone, recomputed without a cache
                torch.testing.assert_close(logits[i], model(torch.tensor([s]))[0, -1], atol=ATOL, rtol=0)
            tok = torch.randint(0, 97, (8,), generator=g)
            for i in range(8):
                seqs[i].append(int(tok[i]))
            logits = batch.step(tok)
    # and end to end: the batched greedy outputs are each prompt's own
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=12)
    together = engine.generate(prompts, params)
    for p, r in zip(prompts, together):
        assert r.ids == engine.generate([p], params)[0].ids


def test_encoder_decoder_cached_equals_full_recompute():
    model = tiny(arch="encoder-decoder", n_encoder_layers=2, positional="sinusoidal", pad_token_id=0)
    sources = random_prompts(3, 2, 12, seed=5)
    g = torch.Generator().manual_seed(6)
    batch = Seq2SeqBatch(model, sources, start_id=0, room=8)
    targets = [[0] for _ in sources]
    with torch.no_grad():
        logits = batch.prefill()
        for _ in range(8):
            for i, (src, tgt) in enumerate(zip(sources, targets)):
                full = model(torch.tensor([src]), torch.tensor([tgt]))[0, -1]
                torch.testing.assert_close(logits[i], full, atol=ATOL, rtol=0)
            tok = torch.randint(0, 97, (3,), generator=g)
            for i in range(3):
                targets[i].append(int(tok[i]))
            logits = batch.step(tok)
    assert all(kv is not None for kv in batch.cache.cross)  # the encoder output was projected once


def test_encoder_decoder_generation_matches_recomputed_logprobs():
    model = tiny(arch="encoder-decoder", pad_token_id=0)
    sources = random_prompts(3, 3, 10, seed=7)
    rs = Engine(model).generate(sources, SamplingParams(strategy="sample", seed=3, max_new_tokens=6))
    for src, r in zip(sources, rs):
        tgt = torch.tensor([[0] + r.ids[:-1]])
        with torch.no_grad():
            lp = model(torch.tensor([src]), tgt)[0].log_softmax(-1)
        assert r.logprobs == pytest.approx(lp[torch.arange(len(r.ids)), r.ids].tolist(), abs=1e-5)


# ------------------------------------------------------------------------------ strategies


def test_logprobs_are_the_raw_distribution_and_top_alternatives_sorted():
    model = tiny()
    prompt = [5, 6, 7]
    r = Engine(model).generate([prompt], SamplingParams(strategy="sample", temperature=0.5, top_k=10, seed=1,
                                                        max_new_tokens=8, top_logprobs=4))[0]
    with torch.no_grad():
        lp = model(torch.tensor([prompt + r.ids]))[0, len(prompt) - 1:-1].log_softmax(-1)
    assert r.logprobs == pytest.approx(lp[torch.arange(8), r.ids].tolist(), abs=1e-5)
    for j, top in enumerate(r.top_logprobs):
        assert len(top) == 4 and [t for t, _ in top] == lp[j].topk(4).indices.tolist()
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_greedy_equals_beam_width_1_equals_top_k_1():
    model = tiny()
    prompts = random_prompts(4, 2, 9, seed=8)
    engine = Engine(model)
    greedy = [r.ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=10))]
    beam1 = [r.ids for r in engine.generate(prompts, SamplingParams(strategy="beam", num_beams=1,
                                                                   max_new_tokens=10))]
    topk1 = [r.ids for r in engine.generate(prompts, SamplingParams(strategy="sample", top_k=1, seed=0,
                                                                   temperature=1.3, max_new_tokens=10))]
    assert greedy == beam1 == topk1


def test_seeded_sample_repeats_exactly_and_seeds_differ():
    engine = Engine(tiny())
    prompts = random_prompts(3, 2, 6, seed=9)
    p = SamplingParams(strategy="sample", temperature=1.5, top_p=0.95, seed=123, max_new_tokens=12)
    a, b = engine.generate(prompts, p), engine.generate(prompts, p)
    assert [r.ids for r in a] == [r.ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    c = engine.generate(prompts, SamplingParams(**{**p.__dict__, "seed": 124}))
    assert [r.ids for r in a] != [r.ids for r in c]


class MarkovToy(nn.Module):
    """A model whose next-token distribution depends only on the last token (fixed transition table),
    with the engine-facing signature: features() returns the one-hot of each token, lm_logits maps it to
    the log transition probabilities. Tokens: 0 start, 1 A, 2 B, 3 X, 4 EOS.

    from start: A .5, B .4, X .1     from A: EOS .3, A .25, B .25, X .2     from B: X .9, others .1/3
    from X: EOS .99, others .01/3    from EOS: EOS 1.
    Greedy takes A (.5) and then ends with EOS (.3): probability .15. The best sequence is B X EOS:
    .4 x .9 x .99 = .3564."""

    P = [[0.0, 0.5, 0.4, 0.1, 0.0], [0.0, 0.25, 0.25, 0.2, 0.3], [0.0, 0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3],
         [0.0, 0.01 / 3, 0.01 / 3, 0.01 / 3, 0.99], [0.0, 0.0, 0.0, 0.0, 1.0]]

    def __init__(self):
        super().__init__()
        self.config = ModelConfig(vocab_size=5, context_length=16, d_model=4, n_heads=1, n_layers=1)
        self.table = nn.Parameter(torch.tensor(self.P).clamp_min(1e-12).log())
        self.decoder = self.encoder = None

    def features(self, ids, *, attention_mask=None, positions=None, cache=None):
        if cache is not None:
            cache.advance(ids.shape[1])
        return nn.functional.one_hot(ids, 5).float()                                   # (B, T, 5)

    def lm_logits(self, hidden):
        return hidden @ self.table


def test_beam_search_finds_the_best_sequence_greedy_misses():
    engine = Engine(MarkovToy())
    base = dict(max_new_tokens=5, eos_token_ids=(4,))
    greedy = engine.generate([[0]], SamplingParams(**base))[0]
    assert greedy.ids == [1, 4] and greedy.finish_reason == "stop"
    for lp in (0.0, 1.0):
        r = engine.generate([[0]], SamplingParams(strategy="beam", num_beams=2, length_penalty=lp,
                                                  num_return_sequences=2, **base))[0]
        assert r.ids == [2, 3, 4] and r.finish_reason == "stop" and r.stop_len == 1
        assert r.score == pytest.approx(math.log(0.4 * 0.9 * 0.99) / 3 ** lp, abs=1e-5)
        # the runner-up: A EOS (.15) by total probability; A B X EOS (.111, 4 tokens) per token
        second, p2 = ([1, 4], 0.5 * 0.3) if lp == 0.0 else ([1, 2, 3, 4], 0.5 * 0.25 * 0.9 * 0.99)
        assert r.beams[1].ids == second
        assert r.beams[1].score == pytest.approx(math.log(p2) / len(second) ** lp, abs=1e-5)
        assert r.content_ids == [2, 3]
        assert r.logprobs == pytest.approx([math.log(0.4), math.log(0.9), math.log(0.99)], abs=1e-5)
    # top alternatives of each beam token, under the model's distribution
    r = engine.generate([[0]], SamplingParams(strategy="beam", num_beams=2, top_logprobs=2, **base))[0]
    assert [t for t, _ in r.top_logprobs[0]] == [1, 2] and r.top_logprobs[1][0][0] == 3
    assert r.top_logprobs[0][1][1] == pytest.approx(math.log(0.4), abs=1e-5)


def test_stop_sequences_eos_and_finish_reasons():
    model = tiny()
    engine = Engine(model)
    prompt = random_prompts(1, 4, 4, seed=10)[0]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=12))[0]
    assert free.finish_reason == "length" and len(free.ids) == 12 and free.stop_len == 0
    eos = free.ids[4]
    r = engine.generate([prompt], SamplingParams(max_new_tokens=12, eos_token_ids=(eos,)))[0]
    first = free.ids.index(eos)
    assert r.ids == free.ids[: first + 1] and r.finish_reason == "stop" and r.content_ids == free.ids[:first]
    stop = tuple(free.ids[6:8])
    r = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_sequences=(stop,)))[0]
    assert tuple(r.ids[-2:]) == stop and r.stop_len == 2 and len(r.ids) <= 8
    # the context window: 48 positions, a 45-token prompt may add 3
    r = engine.generate([list(range(45))], SamplingParams(max_new_tokens=10))[0]
    assert len(r.ids) == 3 and r.finish_reason == "context"


def test_finished_sequences_leave_the_batch(monkeypatch):
    model = tiny()
    sizes = []
    step = DecoderBatch.step

    def spy(self, tokens):
        sizes.append(len(tokens))
        return step(self, tokens)

    monkeypatch.setattr(DecoderBatch, "step", spy)
    prompts = [list(range(44)), [1, 2, 3], [4, 5]]  # the first has room for 4 tokens (context 48)
    rs = Engine(model).generate(prompts, SamplingParams(max_new_tokens=7))
    assert [len(r.ids) for r in rs] == [4, 7, 7] and rs[0].finish_reason == "context"
    assert sizes == [3, 3, 3, 2, 2, 2]
    monkeypatch.undo()
    assert [r.ids for r in rs] == [Engine(model).generate([p], SamplingParams(max_new_tokens=7))[0].ids
                                   for p in prompts]


def test_streaming_concatenated_equals_generate():
    engine = Engine(tiny())
    prompts = random_prompts(4, 1, 10, seed=11)
    for params in (SamplingParams(strategy="sample", seed=5, max_new_tokens=9, top_p=0.9),
                   SamplingParams(max_new_tokens=9, eos_token_ids=(3, 7)),
                   SamplingParams(strategy="beam", num_beams=3, max_new_tokens=6)):
        streamed: dict[int, list[int]] = {i: [] for i in range(4)}
        finals = {}
        for ev in engine.stream(prompts, params):
            assert ev.index not in finals, "no token after a sequence's last event"
            streamed[ev.index].append(ev.token)
            if ev.result is not None:
                finals[ev.index] = ev.result
        results = engine.generate(prompts, params)
        assert [streamed[i] for i in range(4)] == [r.ids for r in results]
        assert [finals[i].ids for i in range(4)] == [r.ids for r in results]


# ------------------------------------------------------------------------------ sessions, compiled step


def test_session_reuses_the_cache_and_equals_a_fresh_prefill():
    model = tiny(positional="rope", n_kv_heads=2)
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=6, top_logprobs=2)
    session = engine.session()
    first = [5, 6, 7, 8, 9]
    r1 = engine.generate([first], params, session=session)[0]
    assert (session.reused, session.prefilled) == (0, 5)
    assert session.ids == first + r1.ids[:-1]  # the last new token was never fed back

    def same_as_fresh(prompt, reused):
        got = engine.generate([prompt], params, session=session)[0]
        fresh = engine.generate([prompt], params)[0]
        assert (session.reused, session.prefilled) == (reused, len(prompt) - reused)
        assert got.ids == fresh.ids
        assert got.logprobs == pytest.approx(fresh.logprobs, abs=ATOL)
        # prefill FLOPs: only tokens reused..L-1, token t attending to t + 1 keys, and the LM head once
        fc, L = FlopCounter(model), len(prompt)
        keys = sum(t + 1 for t in range(reused, L))
        expected = fc.dec * (L - reused) + fc._attn(fc.n_dec, keys) + fc.head
        assert got.metrics.prefill_flops == pytest.approx(expected)

    turn = first + r1.ids + [11, 12, 13]          # the next turn: the reply and a new message
    same_as_fresh(turn, len(first) + len(r1.ids) - 1)
    same_as_fresh(turn[:7] + [40, 41], 7)          # an edit after token 7: the prefix before it is kept
    same_as_fresh([1, 2, 3], 0)                    # nothing in common: a fresh prefill in the same cache
    same_as_fresh([1, 2, 3], 2)                    # the same prompt again: only its last token is computed
    # beam search keeps no cache; the session is emptied, not corrupted
    beam = engine.generate([[1, 2, 3]], SamplingParams(strategy="beam", num_beams=2, max_new_tokens=4),
                           session=session)[0]
    assert session.ids == [] and beam.ids == engine.generate(
        [[1, 2, 3]], SamplingParams(strategy="beam", num_beams=2, max_new_tokens=4))[0].ids
    same_as_fresh([1, 2, 3, 4], 0)
    with pytest.raises(GlassmindError, match="exactly one prompt"):
        engine.generate([[1], [2]], params, session=session)


def test_chat_reply_with_the_kept_cache_prefills_only_the_new_part(run_dir):
    from glassmind.infer.chat import ChatConfig, Conversation, reply, chat_loop
    from glassmind.infer.generate import load_run, sampling_params, stop_ids

    model, tok = load_run(run_dir, device="cpu")
    engine = Engine(model)
    params = sampling_params(ChatConfig(strategy="greedy", max_new_tokens=8), stop_ids(tok))
    conv, session = Conversation(tok, model.config.context_length, 8), engine.session()
    last_prompt = 0
    for n, msg in enumerate(["def add", "return a", "more", "and b"]):
        conv.add("user", msg)
        prompt = conv.prompt_ids()
        fresh = engine.generate([prompt], params)[0]
        text, info = reply(engine, conv, params, lambda s: None, session)
        assert session.ids[: len(prompt)] == prompt
        assert text == tok.decode(fresh.content_ids).split("\nUser:")[0].strip()
        assert info["prompt"] == len(prompt) and info["prefilled"] == session.prefilled
        if n:  # only what follows the previous prompt: the reply as re-encoded and the new message
            assert 0 < info["prefilled"] <= len(prompt) - last_prompt
        last_prompt = len(prompt)
        conv.add("assistant", text)
    # a transcript that outgrows the context is trimmed, read afresh, and the loop says so
    lines = iter(["def add(a, b): return a + b " * 4] * 4)

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    shown: list[str] = []
    chat_loop(engine, tok, ChatConfig(strategy="greedy", max_new_tokens=8), read=read, write=shown.append)
    assert sum("prefilled" in s for s in shown) == 4
    assert any("context full" in s for s in shown)


def eager_and_compiled(model, room: int):
    """A left-padded batch of 3 prompts, a compiling Engine, and the same batch as an eager DecoderBatch and as
    a CompiledDecoderBatch over that engine's step."""
    from glassmind.infer.compiled import CompiledDecoderBatch

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    engine = Engine(model, compile=True)
    return prompts, engine, DecoderBatch(model, prompts, room=room), CompiledDecoderBatch(model, prompts, engine._step)


def test_compiled_step_equals_the_eager_step():
    """The compiled decode step (static shapes, the whole cache under a mask) against the eager step, on a
    left-padded batch with rows finishing at different times; about 20 s of compilation on 2 cores."""
    pytest.importorskip("torch._inductor")
    model = tiny(positional="learned")
    prompts, engine, eager, compiled = eager_and_compiled(model, room=13)
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        a, b = eager.prefill(), compiled.prefill()
        for _ in range(10):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
            tok = torch.randint(0, 97, (3,), generator=g)
            a, b = eager.step(tok), compiled.step(tok)
        keep = torch.tensor([2, 0])  # a finished row leaves: the compiled batch keeps its shape
        eager.select(keep)
        compiled.select(keep)
        for _ in range(3):
            tok = torch.randint(0, 97, (2,), generator=g)
            a, b = eager.step(tok), compiled.step(tok)
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    params = SamplingParams(max_new_tokens=12, eos_token_ids=(3,), stop_sequences=((1, 2),))
    for x, y in zip(engine.generate(prompts, params), Engine(model).generate(prompts, params)):
        assert x.ids == y.ids and x.finish_reason == y.finish_reason
        assert x.logprobs == pytest.approx(y.logprobs, abs=ATOL)
    # the weights are frozen (packed) into the compiled step: an in-place change that bumps no version
    # counter must still be seen by the next call (a recompilation), not decoded with the old constants
    before = [r.ids for r in engine.generate(prompts, params)]
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(-3.0)
    after = engine.generate(prompts, params)
    assert [r.ids for r in after] == [r.ids for r in Engine(model).generate(prompts, params)] != before


@pytest.mark.skipif(not os.environ.get("GLASSMIND_TEST_BF16_COMPILE"),
                    reason="~45 s of max-autotune compilation; set GLASSMIND_TEST_BF16_COMPILE=1 to run")
def test_compiled_bf16_step_equals_the_eager_step_to_rounding():
    """bf16 compiles with concat_linear and max-autotune's C++ GEMMs (CompiledStep): the same logits as the
    eager step to bf16 rounding (a few units in the last place of logits of order 3)."""
    model = tiny(init_std=0.2).to(torch.bfloat16)
    _, _, eager, compiled = eager_and_compiled(model, room=8)
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        a, b = eager.prefill(), compiled.prefill()
        for _ in range(6):
            assert a.abs().max() > 1
            torch.testing.assert_close(b, a, atol=0.08, rtol=0)
            tok = torch.randint(0, 97, (3,), generator=g)
            a, b = eager.step(tok), compiled.step(tok)


# ------------------------------------------------------------------------------ transformers parity


def _gpt2_pair(seed: int):
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from glassmind.model.interop import from_hf

    torch.manual_seed(seed)
    # a wide init spreads the logits, so outputs vary instead of repeating one token
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    initializer_range=0.3, bos_token_id=0, eos_token_id=0)).eval()
    return hf, from_hf(hf)


def test_greedy_equals_transformers_generate():
    hf, ours = _gpt2_pair(0)
    engine = Engine(ours)
    g = torch.Generator().manual_seed(0)
    for L in (1, 5, 11):
        ids = torch.randint(1, 96, (2, L), generator=g)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=25,
                          eos_token_id=None, pad_token_id=0)
        rs = engine.generate(ids.tolist(), SamplingParams(max_new_tokens=25))
        assert [r.ids for r in rs] == ref[:, L:].tolist()
        assert len(set(rs[0].ids)) > 2


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.0, True), (2.0, False),
                                                           (-0.5, False)])
def test_beam_search_equals_transformers_num_beams_4(length_penalty, early_stopping):
    hf, ours = _gpt2_pair(1)
    engine = Engine(ours)
    g = torch.Generator().manual_seed(length_penalty.__hash__() % 1000)
    ids = torch.randint(1, 96, (2, 6), generator=g)
    free = engine.generate(ids.tolist(), SamplingParams(max_new_tokens=12))
    eos = free[0].ids[3]  # an id the model likes: hypotheses finish at different lengths
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=4,
                      num_return_sequences=4, max_new_tokens=12, eos_token_id=eos, pad_token_id=eos,
                      length_penalty=length_penalty, early_stopping=early_stopping,
                      output_scores=True, return_dict_in_generate=True)
    rs = engine.generate(ids.tolist(), SamplingParams(strategy="beam", num_beams=4, num_return_sequences=4,
                                                      max_new_tokens=12, eos_token_ids=(eos,),
                                                      length_penalty=length_penalty,
                                                      early_stopping=early_stopping))
    ours_beams = [b for r in rs for b in r.beams]
    assert len({len(b.ids) for b in ours_beams}) > 1, "the test should see hypotheses of several lengths"
    for row, b in zip(ref.sequences[:, 6:].tolist(), ours_beams):
        assert row[: len(b.ids)] == b.ids and all(t == eos for t in row[len(b.ids):])  # HF pads with eos
    assert [b.score for b in ours_beams] == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)
    assert [r.ids for r in rs] == [rs[0].beams[0].ids, rs[1].beams[0].ids]


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' input for a batch of unequal prompts: left-padded ids and the attention mask."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _until_eos(row: list[int], eos: int, pad: int) -> list[int]:
    """A row of transformers' output -> the tokens up to and including the first eos; what follows it must be
    padding (transformers pads finished rows)."""
    if eos not in row:
        return row
    end = row.index(eos) + 1
    assert all(t == pad for t in row[end:]), row
    return row[:end]


def _liked_token(engine, prompts, n: int = 20) -> int:
    """A token the model emits often, used as eos so that rows stop at different lengths."""
    from collections import Counter

    counts = Counter(t for r in engine.generate(prompts, SamplingParams(max_new_tokens=n)) for t in r.ids)
    return counts.most_common(1)[0][0]


def test_left_padded_greedy_with_eos_equals_transformers_generate():
    """Prompts of unequal length (transformers: left padding + attention mask, positions from the mask) with
    an eos that stops some rows early: each row's tokens, up to and including eos, are transformers'."""
    hf, ours = _gpt2_pair(2)
    engine = Engine(ours)
    prompts = random_prompts(6, 1, 12, vocab=95, seed=21)
    prompts = [[t + 1 for t in p] for p in prompts]  # ids 1..95: 0 is the pad below
    assert len({len(p) for p in prompts}) > 2
    eos = _liked_token(engine, prompts)
    ids, mask = _left_padded(prompts, pad=0)
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, eos_token_id=eos,
                      pad_token_id=0)
    rs = engine.generate(prompts, SamplingParams(max_new_tokens=20, eos_token_ids=(eos,)))
    expected = [_until_eos(row, eos, 0) for row in ref[:, ids.shape[1]:].tolist()]
    assert [r.ids for r in rs] == expected
    lengths = {len(r.ids) for r in rs}
    assert len(lengths) > 1 and any(r.finish_reason == "stop" for r in rs), "rows should stop at several lengths"


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.5, True)])
def test_left_padded_beam_search_with_eos_equals_transformers(length_penalty, early_stopping):
    hf, ours = _gpt2_pair(3)
    engine = Engine(ours)
    prompts = [[t + 1 for t in p] for p in random_prompts(3, 2, 9, vocab=95, seed=22)]
    assert len({len(p) for p in prompts}) > 1
    eos = _liked_token(engine, prompts, 12)
    ids, mask = _left_padded(prompts, pad=eos)
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, num_beams=4, num_return_sequences=4,
                      max_new_tokens=12, eos_token_id=eos, pad_token_id=eos, length_penalty=length_penalty,
                      early_stopping=early_stopping, output_scores=True, return_dict_in_generate=True)
    rs = engine.generate(prompts, SamplingParams(strategy="beam", num_beams=4, num_return_sequences=4,
                                                 max_new_tokens=12, eos_token_ids=(eos,),
                                                 length_penalty=length_penalty, early_stopping=early_stopping))
    beams = [b for r in rs for b in r.beams]
    assert len({len(b.ids) for b in beams}) > 1, "the test should see hypotheses of several lengths"
    for row, b in zip(ref.sequences[:, ids.shape[1]:].tolist(), beams):
        assert row[: len(b.ids)] == b.ids and all(t == eos for t in row[len(b.ids):])  # HF pads with eos
    assert [b.score for b in beams] == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)


def _seq2seq_pair(family: str, seed: int):
    pytest.importorskip("transformers")
    import transformers

    from glassmind.model.interop import from_hf

    torch.manual_seed(seed)
    common = dict(vocab_size=90, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  init_std=0.3, forced_eos_token_id=None, forced_bos_token_id=None)  # no forcing processors
    if family == "bart":  # learned positions (offset 2), layer norm on the embeddings, gelu; pad 1, start 2
        hf = transformers.BartForConditionalGeneration(transformers.BartConfig(
            **common, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))
    else:  # sinusoidal positions, scaled embeddings, swish; pad 0 = the decoder's start
        hf = transformers.MarianMTModel(transformers.MarianConfig(
            **common, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))
    hf.eval()
    return hf, from_hf(hf).eval()


def _right_padded(sources: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sources))
    return (torch.tensor([s + [pad] * (width - len(s)) for s in sources]),
            torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources]))


@pytest.mark.parametrize("family", ["bart", "marian"])
def test_encoder_decoder_greedy_and_beam_equal_transformers_generate(family):
    """BART and Marian (converted from transformers) generate what transformers' generate does from the same
    padded sources: greedy with an eos that stops rows early, and beam search (4 beams) with its scores."""
    hf, ours = _seq2seq_pair(family, 4)
    pad, start = hf.config.pad_token_id, hf.config.decoder_start_token_id
    engine = Engine(ours, decoder_start_token_id=start)
    sources = [[t for t in p if t != pad] or [5] for p in random_prompts(4, 3, 12, vocab=90, seed=23)]
    assert len({len(s) for s in sources}) > 1
    ids, mask = _right_padded(sources, pad)
    eos = _liked_token(engine, sources, 15)
    gen = dict(eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=start, max_new_tokens=15,
               do_sample=False)

    ref = hf.generate(ids, attention_mask=mask, **gen)  # (B, 1 + new): the start token first
    rs = engine.generate(sources, SamplingParams(max_new_tokens=15, eos_token_ids=(eos,)))
    assert [r.ids for r in rs] == [_until_eos(row, eos, pad) for row in ref[:, 1:].tolist()]
    assert len({len(r.ids) for r in rs}) > 1

    ref = hf.generate(ids, attention_mask=mask, num_beams=4, num_return_sequences=4, output_scores=True,
                      return_dict_in_generate=True, **{**gen, "pad_token_id": eos})
    rs = engine.generate(sources, SamplingParams(strategy="beam", num_beams=4, num_return_sequences=4,
                                                 max_new_tokens=15, eos_token_ids=(eos,)))
    beams = [b for r in rs for b in r.beams]
    for row, b in zip(ref.sequences[:, 1:].tolist(), beams):
        assert row[: len(b.ids)] == b.ids and all(t == eos for t in row[len(b.ids):])
    assert [b.score for b in beams] == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)


# ------------------------------------------------------------------------------ detokenizer


class ByteToy:
    """A byte-level tokenizer: ids 0..255 are bytes; 256+ are multi-byte pieces, some of them cutting
    characters in half (as real BPE merges do), plus one special token."""

    pieces = [b"\xc3", b"\xa9t\xc3", "é".encode(), "€".encode()[:2], "€".encode()[2:] + b" ", " 日本".encode(),
              "😀".encode()[:3], "😀".encode()[3:], b"ab"]

    def __init__(self):
        self.table = [bytes([i]) for i in range(256)] + self.pieces + [b"<|endoftext|>"]
        self.special_tokens = {"<|endoftext|>": len(self.table) - 1}

    def decode_bytes(self, ids):
        return b"".join(self.table[i] for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_valid(self, text: str) -> list[int]:
        """Greedy longest-piece match over the text's bytes."""
        data, out, i = text.encode(), [], 0
        order = sorted(range(256, 256 + len(self.pieces)), key=lambda t: -len(self.table[t]))
        while i < len(data):
            for t in order:
                if data.startswith(self.table[t], i):
                    out.append(t)
                    i += len(self.table[t])
                    break
            else:
                out.append(data[i])
                i += 1
        return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 255 + len(ByteToy.pieces)), max_size=40))
def test_detokenizer_never_emits_broken_text_on_random_ids(ids):
    tok = ByteToy()
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    for p in pieces:
        p.encode("utf-8")  # a str with half a character (a lone surrogate) would raise here
    assert "".join(pieces) == tok.decode(ids)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abt é€日本😀\n")), max_size=30))
def test_detokenizer_on_valid_utf8_emits_no_replacement_characters(text):
    tok = ByteToy()
    ids = tok.encode_valid(text)
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == text


def test_detokenizer_holds_half_characters_and_skips_specials():
    tok = ByteToy()
    d = Detokenizer(tok)
    euro_a, euro_b = 256 + 3, 256 + 4
    assert d.push(euro_a) == ""           # two of the euro sign's three bytes: nothing yet
    assert d.push(euro_b) == "€ "
    assert d.push(tok.special_tokens["<|endoftext|>"]) == ""
    assert Detokenizer(tok, skip_special=False).push(tok.special_tokens["<|endoftext|>"]) == "<|endoftext|>"


def test_detokenizer_text_mode_for_tokenizers_without_bytes():
    class Words:  # a WordPiece-like decode: "##" joins to the previous word
        vocab = ["hello", "##s", "world", "!"]
        special_tokens: dict = {}

        def decode(self, ids):
            out = ""
            for i in ids:
                w = self.vocab[i]
                out += w[2:] if w.startswith("##") else (" " + w if out else w)
            return out

    d = Detokenizer(Words())
    assert [d.push(i) for i in (0, 1, 2, 3)] == ["hello", "s", " world", " !"]


def test_detokenizer_with_the_real_bpe_tokenizer():
    text = "naïve café – 日本語 😀 test " * 20
    tok = train_bpe(text, 300)
    ids = tok.encode(text)
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) + d.flush() == text


# ------------------------------------------------------------------------------ checks, metrics, fill-mask


class NoForward(nn.Module):
    pass


@pytest.mark.parametrize("prompts,kw,match", [
    ([[1, 2]], dict(temperature=-1), "temperature"),
    ([[1, 2]], dict(top_p=0), "top_p"),
    ([[1, 2]], dict(top_p=1.01), "top_p"),
    ([[1, 2]], dict(top_k=-1), "top_k"),
    ([[1, 2]], dict(strategy="beam", num_beams=0), "beam width"),
    ([list(range(48))], {}, "context"),
    ([[1, 97]], {}, "outside the vocabulary"),
    ([[1, -1]], {}, "outside the vocabulary"),
    ([[]], {}, "empty"),
    ([], {}, "no prompts"),
    ("hello", {}, "token id lists"),
    ([[1.5]], {}, "integer"),
    ([[1, 2]], dict(eos_token_ids=(200,)), "vocabulary"),
])
def test_bad_arguments_fail_before_any_work(prompts, kw, match, monkeypatch):
    model = tiny()
    engine = Engine(model)

    def boom(*a, **k):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(model, "features", boom)
    monkeypatch.setattr(KVCache, "__init__", boom)
    with pytest.raises(GlassmindError, match=match):
        engine.stream(prompts, SamplingParams(**kw))  # raises at the call, not on first iteration


def test_wrong_model_kind_is_an_error():
    with pytest.raises(GlassmindError, match="fill_mask"):
        Engine(tiny(arch="encoder")).generate([[1]])
    with pytest.raises(GlassmindError, match="decoder start"):
        Engine(tiny(arch="encoder-decoder")).generate([[1]])
    with pytest.raises(GlassmindError, match="MLM"):
        Engine(tiny()).fill_mask([[1]], mask_token_id=3)


def test_metrics_and_flops_match_torch_flop_counter(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(n_kv_heads=2, activation="swiglu")
    prompt = list(range(1, 11))
    r = Engine(model).generate([prompt], SamplingParams(max_new_tokens=6))[0]
    m = r.metrics
    assert m.prompt_tokens == 10 and m.new_tokens == 6
    assert 0 < m.ttft_s <= m.total_s and m.itl_p50_s <= m.itl_p95_s
    assert m.tokens_per_s == pytest.approx(6 / m.total_s)
    # torch's counter does not see inside the fused attention kernel: swap it (from outside, for this test)
    # for explicit matmuls; then it counts the prefill's full T x T square, not the causal half our count uses
    def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])                      # (B, H, Tq, Tk)
        if is_causal:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril(scores.shape[-1] - scores.shape[-2])
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(-1) @ v

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", explicit_attention)
    batch = DecoderBatch(model, [prompt], room=5)
    counter = FlopCounter(model)
    cfg = model.config
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        logits = batch.prefill()
    square_extra = 4 * cfg.d_model * cfg.n_layers * (100 - 55)
    assert fc.get_total_flops() == counter.prefill(10) + square_extra == m.prefill_flops + square_extra
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        for tok in r.ids[:5]:
            batch.step(torch.tensor([tok]))
    assert fc.get_total_flops() == counter.decode(10, 5) == m.decode_flops
    assert logits.shape == (1, 97)


def test_fill_mask_top_k():
    model = tiny(arch="encoder", vocab_size=50)
    MASK = 3
    seqs = [[5, 6, MASK, 8, 9], [10, MASK, 12]]
    out = Engine(model).fill_mask(seqs, mask_token_id=MASK, k=4)
    assert [[p.position for p in s] for s in out] == [[2], [1]]
    for s, preds in zip(seqs, out):
        with torch.no_grad():
            probs = model(torch.tensor([s])).logits[0].softmax(-1)                    # alone, unpadded
        for p in preds:
            ref = probs[p.position].topk(4)
            assert [t for t, _ in p.candidates] == ref.indices.tolist()
            assert [q for _, q in p.candidates] == pytest.approx(ref.values.tolist(), abs=1e-5)
    assert Engine(model).fill_mask([[5, 6]], mask_token_id=MASK) == [[]]
    with pytest.raises(GlassmindError):
        Engine(model).fill_mask(seqs, mask_token_id=MASK, k=0)


# ------------------------------------------------------------------------------ the verbs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    tok = train_bpe("def add(a, b):\n    return a + b\n" * 30, 300)
    tok.save(d)
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(vocab_size=tok.vocab_size, context_length=128, d_model=32, n_heads=4,
                            n_layers=2)), d)
    return d


def test_generate_verb_prints_text_and_stats(run_dir):
    from glassmind.infer.generate import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main([str(run_dir), "def add", "--max-new-tokens", "5", "--stats", "--stream",
                     "--strategy", "sample", "--seed", "0", "--top-p", "0.9"]) == 0
    text = out.getvalue()
    assert text.startswith("def add") and "time to first token" in text and "tokens/s" in text
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([str(run_dir), "x", "--strategy", "beam", "--num-return-sequences", "2",
                     "--max-new-tokens", "3"]) == 0
    assert out.getvalue().count("--- beam") == 2
    assert main([str(run_dir), "x", "--top-p", "0"]) == 2  # a clear error, exit code 2


def test_demo_stage_tabulates_every_strategy(run_dir):
    from glassmind.demo import demo_strategies, generate_stage

    table = generate_stage(run_dir, ["def add", "return"], max_new_tokens=4)
    lines = table.splitlines()
    assert len(lines) == 2 + 2 * len(demo_strategies()) and "TTFT ms" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_chat_loop_keeps_the_conversation(run_dir):
    from glassmind.infer.chat import ChatConfig, Conversation, chat_loop
    from glassmind.infer.generate import load_run

    model, tok = load_run(run_dir, device="cpu")
    lines = iter(["hello", "/reset", "again", "more"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    shown = []
    conv = chat_loop(Engine(model), tok, ChatConfig(max_new_tokens=8, seed=0), read=read, write=shown.append)
    assert [t["role"] for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    assert conv.turns[0]["content"] == "again"
    assert sum("tokens/s" in s for s in shown) == 3
    assert tok.decode(conv.prompt_ids()).startswith("User: again\nAssistant:")
    assert "\nUser: more\nAssistant: " in tok.decode(conv.prompt_ids())
    # a conversation longer than the context loses its oldest turns first
    small = Conversation(tok, context_length=80, reserve=8)
    for n in range(6):
        small.add("user" if n % 2 == 0 else "assistant", f"message {n}")
    ids = small.prompt_ids()
    assert len(ids) <= 72 and tok.decode(ids).endswith("User: message 4\nAssistant: message 5\nAssistant:")
    assert "message 0" not in tok.decode(ids)


def test_chat_uses_the_chat_format_when_the_run_has_chat_tokens():
    from glassmind.infer.chat import Conversation
    from glassmind.infer.generate import stop_ids
    from glassmind.tokenizer.chat import END, ChatFormat, add_chat_tokens

    tok = train_bpe("hello there " * 20, 270)
    plain = Conversation(tok, context_length=64, reserve=8)
    assert not plain.uses_chat_tokens
    add_chat_tokens(tok)
    conv = Conversation(tok, context_length=64, reserve=8)
    conv.add("user", "hi <|end|>")  # typed text cannot forge a control token
    assert conv.uses_chat_tokens
    assert conv.prompt_ids() == ChatFormat(tok).render_prompt([{"role": "user", "content": "hi <|end|>"}])
    assert tok.special_tokens[END] in stop_ids(tok)
