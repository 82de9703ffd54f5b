"""The inference engine: token ids in, token ids out (text is the caller's business; see detok.py).

    prefill   the whole (left-padded) batch of prompts in one forward pass fills a preallocated KV cache
              (the batches, with their model-facing side prefill/step/select, are in batch.py)
    decode    one token per sequence per step, reading the cache; the prefix is never recomputed
    stop      each sequence on its own: EOS ids, stop id sequences, max_new_tokens, the context window;
              a finished sequence leaves the batch (cache rows dropped), so it costs nothing afterwards

Strategies: greedy, sampling (temperature, top-k, top-p, min-p, repetition penalty, seeded), beam search
(beam.py). Encoder-decoders run the encoder once and cache the cross-attention keys/values; encoders
fill masks. Every result carries per-token log-probabilities, the top alternatives and latency metrics.

Log-probabilities are those of the model's own distribution, log softmax(logits), before temperature,
filtering or penalties: what the model believes, comparable across strategies and settings, and what
vLLM (its default "raw" logprobs) and the OpenAI API report. A sampled token can therefore have a logprob
that top-p would consider "filtered", and under temperature 0.5 the reported numbers do not sum to the
sampling distribution; use sampling.process to see the latter.

    engine = Engine(model)
    [r] = engine.generate([[464, 2068, 7586]], SamplingParams(strategy="sample", top_p=0.9, seed=0))
    r.ids, r.logprobs, r.finish_reason, r.metrics.ttft_s
    for ev in engine.stream(prompts, params): print(ev.index, ev.token)
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from glassmind.common import GlassmindError
from glassmind.infer import fast_linear
from glassmind.infer.batch import DecodeBatch, DecoderBatch, Seq2SeqBatch, Session
from glassmind.infer.compiled import CompiledDecoderBatch, CompiledStep
from glassmind.infer.beam import Hypothesis, beam_search
from glassmind.infer.continuous import BatchSampler, RowSampler
from glassmind.infer.sampling import SamplingParams, stop_length


# ----------------------------------------------------------------------------------------------------
# results


@dataclass
class Metrics:
    """Latency and cost of one sequence. Times in seconds from the start of the generate call.

    ttft_s is the prefill (the whole batch's) plus choosing the first token; inter-token latencies are the
    gaps between this sequence's consecutive tokens. FLOPs count this sequence's useful matmul work (no
    padding): 2 x weights per token plus attention (QK^T and AV over the keys each token actually sees)
    plus the LM head for the rows whose logits are computed (the prompt's last token, each new token)."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    total_s: float
    itl_mean_s: float | None
    itl_p50_s: float | None
    itl_p95_s: float | None
    tokens_per_s: float
    prefill_flops: float
    decode_flops: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int]                                   # generated ids, the stop marker (EOS...) included
    logprobs: list[float]                            # log p(token) under the model's raw distribution
    top_logprobs: list[list[tuple[int, float]]]      # per token: the top_logprobs most likely (id, logprob)
    finish_reason: str                               # "stop" | "length" (max_new_tokens) | "context"
    stop_len: int                                    # trailing ids that are the stop marker (0 unless stop)
    metrics: Metrics
    score: float | None = None                       # beam: length-penalised score of `ids`
    beams: list[Hypothesis] = field(default_factory=list)  # beam: the num_return_sequences best, best first

    @property
    def content_ids(self) -> list[int]:
        """The generated ids without the stop marker (what a reader is shown)."""
        return self.ids[: len(self.ids) - self.stop_len]


@dataclass
class StreamEvent:
    """One new token of sequence `index` (the position of its prompt in the call). The sequence's last
    event carries its finish_reason and the complete result."""

    index: int
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None = None
    result: GenerationResult | None = None


@dataclass
class MaskPrediction:
    position: int                                    # index of the [MASK] in its sequence
    candidates: list[tuple[int, float]]              # (token id, probability), most likely first


# ----------------------------------------------------------------------------------------------------
# FLOPs


def _linear_weights(module: nn.Module | None, *, skip=lambda name: False) -> int:
    if module is None:
        return 0
    return sum(m.weight.numel() for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and not skip(name))


class FlopCounter:
    """Forward matmul FLOPs of the work the engine does for one sequence (Kaplan et al. 2020, table 1:
    2 FLOPs per weight per token; attention 2 x 2 x d_model per (query, key) pair per layer)."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.d, self.head = cfg.d_model, 2.0 * cfg.vocab_size * cfg.d_model
        is_cross_kv = lambda n: "cross_attn.k_proj" in n or "cross_attn.v_proj" in n  # noqa: E731
        self.dec = 2.0 * _linear_weights(model.decoder, skip=is_cross_kv)
        self.cross_kv = 2.0 * (_linear_weights(model.decoder) - _linear_weights(model.decoder, skip=is_cross_kv))
        self.enc = 2.0 * _linear_weights(model.encoder) if cfg.arch == "encoder-decoder" else 0.0
        self.n_dec, self.n_enc = cfg.n_decoder_layers, cfg.n_encoder_layers_total
        self.seq2seq = cfg.arch == "encoder-decoder"

    def _attn(self, n_layers: int, pairs: float) -> float:
        return 4.0 * self.d * n_layers * pairs

    def prefill(self, L: int) -> float:
        if self.seq2seq:  # encoder over the source (every query sees every key), cross K/V once, start token
            return (self.enc * L + self._attn(self.n_enc, L * L) + self.cross_kv * L
                    + self.dec + self._attn(self.n_dec, 1 + L) + self.head)
        return self.dec * L + self._attn(self.n_dec, L * (L + 1) / 2) + self.head   # causal: t keys at t

    def decode(self, L: int, steps: int) -> float:
        """`steps` decode forwards after a prefill of L tokens (source length L for encoder-decoders)."""
        if steps <= 0:
            return 0.0
        if self.seq2seq:  # decoder step i sees i + 2 target keys and L source keys
            keys = sum(i + 2 + L for i in range(steps))
        else:             # step i sees the prompt, the i earlier new tokens and itself
            keys = steps * (L + 1) + steps * (steps - 1) / 2
        return steps * (self.dec + self.head) + self._attn(self.n_dec, keys)


# ----------------------------------------------------------------------------------------------------
# the engine


class Engine:
    """Generation over one model. `decoder_start_token_id` is the first target token of an encoder-decoder
    (default: config.pad_token_id, as BART/T5/Marian do in transformers)."""

    def __init__(self, model: nn.Module, *, decoder_start_token_id: int | None = None, compile: bool = False,
                 packed: bool = True):
        self.model = model
        # packed: eager decoder decode steps multiply by weights packed once per generate call (fast_linear.py:
        # the same results to rounding, 1.2-1.35x faster steps on CPU); False runs the model's own F.linear
        self.packed = packed
        self.config = model.config
        self.decoder_start_token_id = (decoder_start_token_id if decoder_start_token_id is not None
                                       else self.config.pad_token_id)
        self.flops = FlopCounter(model) if self.config.arch != "encoder" else None
        # compile=True: greedy/sample decode steps of a decoder run a CompiledStep (compiled on first use per
        # batch size, which takes seconds to a minute); prefill, beam search and encoder-decoders stay eager
        self._step = CompiledStep(model) if compile and self.config.arch == "decoder" else None

    def session(self) -> Session:
        """A Session: pass it to generate/stream to keep one conversation's KV cache between calls."""
        return Session()

    # -- public API --------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
                 session: Session | None = None) -> list[GenerationResult]:
        """Generate for every prompt (token id lists; for an encoder-decoder, the source ids); results in
        prompt order. With a `session` (one decoder prompt), reuse its kept KV cache (see Session)."""
        results: list[GenerationResult | None] = [None] * len(prompts)
        for ev in self.stream(prompts, params, session=session):
            if ev.result is not None:
                results[ev.index] = ev.result
        return results  # type: ignore[return-value]

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
               session: Session | None = None) -> Iterator[StreamEvent]:
        """Yield one StreamEvent per new token per sequence, as produced (sequences interleave). Beam search
        cannot know its output before it ends, so with strategy 'beam' each sequence's tokens come at once
        at the end. All arguments are checked before the first forward pass."""
        params = params or SamplingParams()
        prompts = self._check(prompts, params)
        if session is not None:
            if not isinstance(session, Session):
                raise GlassmindError(f"session must come from Engine.session(), got {type(session).__name__}")
            if self.config.arch != "decoder" or len(prompts) != 1:
                raise GlassmindError("a session keeps one decoder conversation: pass exactly one prompt "
                                     "(and use a decoder model)")
        return self._run(prompts, params, session)

    def fill_mask(self, ids: Sequence[Sequence[int]], mask_token_id: int, k: int = 5
                  ) -> list[list[MaskPrediction]]:
        """For each sequence, the k most likely tokens (with probabilities) at every `mask_token_id`
        position, from an encoder with an MLM head (Devlin et al. 2019, sec. 3.1)."""
        cfg = self.config
        if cfg.arch != "encoder" or cfg.head != "mlm":
            raise GlassmindError(f"fill_mask needs an encoder with an MLM head; this model is a {cfg.arch} "
                                 f"with head {cfg.head!r}")
        if not isinstance(k, int) or not 1 <= k <= cfg.vocab_size:
            raise GlassmindError(f"k must be an integer in [1, {cfg.vocab_size}], got {k!r}")
        seqs = self._check_ids(ids, limit=cfg.context_length, what="sequence")
        p = next(self.model.parameters())
        B, T = len(seqs), max(len(x) for x in seqs)
        x = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True                                                           # right padding
        with torch.inference_mode(), _eval(self.model):
            logits = self.model(x.to(p.device), attention_mask=mask.to(p.device)).logits      # (B, T, V)
        out: list[list[MaskPrediction]] = []
        for i, s in enumerate(seqs):
            where = [t for t, tok in enumerate(s) if tok == mask_token_id]
            if not where:
                out.append([])
                continue
            probs = logits[i, where].float().softmax(-1)                                       # (M, V)
            top_p, top_i = probs.topk(k, dim=-1)
            out.append([MaskPrediction(t, list(zip(ti, tp)))
                        for t, ti, tp in zip(where, top_i.tolist(), top_p.tolist())])
        return out

    # -- checks --------------------------------------------------------------------------------------------
    def _check_ids(self, prompts: Any, *, limit: int, what: str) -> list[list[int]]:
        V = self.config.vocab_size
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise GlassmindError(f"prompts must be a list of token id lists, got {type(prompts).__name__}; "
                                 "encode text with the run's tokenizer first")
        if len(prompts) == 0:
            raise GlassmindError("no prompts given")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            if isinstance(p, int) or not isinstance(p, Sequence) or isinstance(p, (str, bytes)):
                raise GlassmindError(f"prompt {i} must be a list of token ids (got {type(p).__name__}); "
                                     "for one prompt pass [ids]")
            try:
                if any(isinstance(t, bool) for t in p):
                    raise TypeError
                p = [operator.index(t) for t in p]     # ints, numpy ints; not floats
            except TypeError:
                raise GlassmindError(f"{what} {i} must hold integer token ids") from None
            if not p:
                raise GlassmindError(f"{what} {i} is empty: give at least one token (e.g. BOS/<|endoftext|>)")
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise GlassmindError(f"{what} {i} has token ids outside the vocabulary [0, {V}): {bad[:5]}; "
                                     "is the tokenizer the model's?")
            if len(p) > limit:
                raise GlassmindError(f"{what} {i} has {len(p)} tokens but at most {limit} fit the context "
                                     f"({self.config.context_length}): shorten it")
            out.append(p)
        return out

    def _check(self, prompts: Any, params: SamplingParams) -> list[list[int]]:
        cfg = self.config
        if cfg.arch == "encoder":
            raise GlassmindError("an encoder does not generate text: use Engine.fill_mask")
        if cfg.head != "lm":
            raise GlassmindError(f"generation needs the LM head; this model has head {cfg.head!r}")
        if not isinstance(params, SamplingParams):
            raise GlassmindError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate(cfg.vocab_size)
        if cfg.arch == "encoder-decoder":
            if self.decoder_start_token_id is None:
                raise GlassmindError("this encoder-decoder has no decoder start token: pass "
                                     "Engine(model, decoder_start_token_id=...) or set config.pad_token_id")
            # the target side holds the start token + new tokens, so a source may fill the whole context
            return self._check_ids(prompts, limit=cfg.context_length, what="source")
        # a decoder prompt must leave room for at least one new token
        return self._check_ids(prompts, limit=cfg.context_length - 1, what="prompt")

    def _budget(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[int], list[str]]:
        """Per sequence: how many tokens it may generate, and the finish reason when it reaches that many.
        The whole sequence (prompt + new, or start token + new) must fit the context window."""
        C = self.config.context_length
        out, reasons = [], []
        for p in prompts:
            room = C - 1 if self.config.arch == "encoder-decoder" else C - len(p)
            out.append(min(params.max_new_tokens, room))
            reasons.append("length" if params.max_new_tokens <= room else "context")
        return out, reasons

    def _batch(self, prompts: list[list[int]], room: int, params: SamplingParams, session: Session | None
               ) -> DecodeBatch:
        """The one place a speed path is chosen. Eager: the model itself; packed: decode steps through a view
        of it whose weights are packed once per call (fast_linear.py), when the machine has a kernel for them
        and the call is long enough to repay packing; compiled: one torch.compile'd step of fixed shapes
        (compiled.py; greedy and sampling on decoders)."""
        if self.config.arch == "encoder-decoder":
            return Seq2SeqBatch(self.model, prompts, self.decoder_start_token_id, room)  # type: ignore[arg-type]
        if params.strategy == "beam":  # beams are reordered copies of caches: nothing to keep, no fixed shape
            if session is not None:
                session.reset()
            return DecoderBatch(self.model, prompts, room, decode_model=self._packed(room))
        if self._step is not None:
            return CompiledDecoderBatch(self.model, prompts, self._step, session=session)
        return DecoderBatch(self.model, prompts, room, session=session, decode_model=self._packed(room))

    def _packed(self, room: int) -> Callable[[int], nn.Module] | None:
        return fast_linear.packed_decode(self.model, room) if self.packed else None

    # -- the loop --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, prompts: list[list[int]], params: SamplingParams, session: Session | None = None
             ) -> Iterator[StreamEvent]:
        with _eval(self.model):
            t0 = time.perf_counter()
            max_new, reasons = self._budget(prompts, params)
            # the cache holds the prompt and every new token but the last (which is never fed back)
            batch = self._batch(prompts, max(max_new) - 1, params, session)
            if params.strategy == "beam":
                yield from self._beam(batch, prompts, params, max_new, reasons, t0)
            else:
                yield from self._sample(batch, prompts, params, max_new, reasons, t0)

    def _sample(self, batch, prompts, params, max_new, reasons, t0) -> Iterator[StreamEvent]:
        """Greedy or sampling: one token per live row per step; rows leave the batch when they finish."""
        B, V = len(prompts), self.config.vocab_size
        eos = frozenset(params.eos_token_ids)
        stops = tuple(tuple(s) for s in params.stop_sequences)
        out: list[_Partial] = [_Partial() for _ in range(B)]
        alive = list(range(B))                     # prompt index of each batch row
        logits = batch.prefill()                                                       # (B, V)
        device = logits.device
        # the continuous batch's sampler, so that a server row and this call choose the same tokens: sequence
        # i is a row seeded with seed + i (make_generators' convention), with its own uniforms
        sampler = BatchSampler.of([RowSampler(params, p, V, device, seed_offset=i, max_new=max_new[i])
                                   for i, p in enumerate(prompts)], V, device)
        while True:
            picks = sampler.choose(logits)
            now = time.perf_counter()
            keep = []
            for r, i in enumerate(alive):
                o, c = out[i], picks[r]
                o.add(c.token, c.logprob, c.top_logprobs, now)
                n = stop_length(o.ids, eos, stops)
                reason = "stop" if n else (reasons[i] if len(o.ids) >= max_new[i] else None)
                result = None
                if reason is not None:
                    result = self._result(prompts[i], o.ids, o.logprobs, o.tops, reason, n, t0, o.times,
                                          reused=getattr(batch, "reused", 0))
                else:
                    keep.append(r)
                yield StreamEvent(i, c.token, c.logprob, c.top_logprobs, reason, result)
            if not keep:
                return
            tok = torch.tensor([picks[r].token for r in keep], dtype=torch.long, device=device)
            if len(keep) < len(alive):         # finished rows leave the batch: no more compute for them
                idx = torch.tensor(keep, device=device)
                batch.select(idx)
                sampler.select(idx)
                alive = [alive[r] for r in keep]
            logits = batch.step(tok)

    def _beam(self, batch, prompts, params, max_new, reasons, t0) -> Iterator[StreamEvent]:
        finished, clock = beam_search(batch, params, prompts, max_new, reasons, self.config.vocab_size)
        for i, hyps in enumerate(finished):
            best = hyps[0]
            result = self._result(prompts[i], best.ids, best.logprobs, best.top_logprobs, best.finish_reason,
                                  best.stop_len, t0, clock[i][: len(best.ids)])
            result.score = best.score
            result.beams = hyps[: params.num_return_sequences]
            for j, tok in enumerate(best.ids):
                last = j == len(best.ids) - 1
                yield StreamEvent(i, tok, best.logprobs[j], best.top_logprobs[j],
                                  best.finish_reason if last else None, result if last else None)

    def _result(self, prompt, ids, logprobs, tops, reason, stop_len, t0, times, reused: int = 0
                ) -> GenerationResult:
        n, L = len(ids), len(prompt)
        prefill = self.flops.prefill(L)
        if reused:  # a session's cached prefix was not recomputed: only tokens reused..L-1 were
            prefill -= self.flops.prefill(reused) - self.flops.head
        gaps = [b - a for a, b in zip(times, times[1:])]
        total = times[-1] - t0
        m = Metrics(prompt_tokens=L, new_tokens=n, ttft_s=times[0] - t0, total_s=total,
                    itl_mean_s=statistics.fmean(gaps) if gaps else None,
                    itl_p50_s=_percentile(gaps, 50), itl_p95_s=_percentile(gaps, 95),
                    tokens_per_s=n / total if total > 0 else math.inf,
                    prefill_flops=prefill, decode_flops=self.flops.decode(L, n - 1))
        return GenerationResult(list(prompt), list(ids), list(logprobs), list(tops), reason, stop_len, m)


class _Partial:
    """A sequence's output while it is being generated."""

    def __init__(self):
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.times: list[float] = []

    def add(self, tok: int, lp: float, top: list[tuple[int, float]], now: float) -> None:
        self.ids.append(tok)
        self.logprobs.append(lp)
        self.tops.append(top)
        self.times.append(now)


def _percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class _eval:
    """Eval mode (no dropout) for the duration of a call; the previous mode is restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        # train(mode) sets every submodule's flag (~0.5 ms on the 4-layer model): only when one is training
        self.switched = any(m.training for m in self.model.modules())
        if self.switched:
            self.model.eval()

    def __exit__(self, *exc):
        if self.switched:
            self.model.train(self.was_training)
