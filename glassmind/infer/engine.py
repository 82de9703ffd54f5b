"""The inference engine: token ids in, token ids out (text is the caller's business; see detok.py).

    prefill   the whole (left-padded) batch of prompts in one forward pass fills a preallocated KV cache
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

import itertools
import math
import operator
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from glassmind.common import GlassmindError, cpu_has_amx_bf16
from glassmind.infer import fast_linear
from glassmind.infer.beam import Hypothesis, beam_search
from glassmind.infer.kv_cache import KVCache, StaticKVCache
from glassmind.infer.sampling import SamplingParams, make_generators, process, sample, stop_length


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
# batches: the model-facing side (prefill, one decode step, drop/reorder rows)


class Session:
    """The KV cache of one conversation, kept between generate calls (prefix reuse).

    Pass it with a single prompt to Engine.generate/stream: the longest prefix of the prompt whose keys and
    values are already in the cache is reused and only the rest is prefilled; afterwards the cache holds the
    prompt and every generated token that was fed back to the model. A prompt that shares no prefix (a
    trimmed transcript, another conversation) is prefilled from scratch into the same cache. Beam search
    keeps no cache (its beams are reordered copies): with strategy "beam" the session is emptied.

    `reused` / `prefilled`: how many tokens of the last prompt were read from the cache / computed."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.ids: list[int] = []     # the tokens whose keys/values fill cache slots [0, len(ids))
        self.reused = 0
        self.prefilled = 0
        self._model: nn.Module | None = None

    def reset(self) -> None:
        """Forget the conversation (the cache's memory is kept for the next one)."""
        self.ids = []

    def _take(self, model: nn.Module, prompt: list[int]) -> tuple[KVCache, int]:
        """The cache, rewound to the longest prefix shared with `prompt`, and that prefix's length."""
        if self.cache is None or self._model is not model:
            self.cache, self._model, self.ids = KVCache.for_model(model, 1), model, []
        n = 0
        for a, b in zip(self.ids, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)  # the prompt's last token is always computed: its logits pick the next
        self.cache.pos, self.ids = n, self.ids[:n]
        return self.cache, n

    def _prefilled(self, prompt: list[int], reused: int) -> None:
        self.ids, self.reused, self.prefilled = list(prompt), reused, len(prompt) - reused


class DecoderBatch:
    """A left-padded batch of decoder prompts and its KV cache.

    Left padding puts every prompt's last token in the last column, so one forward gives every row's next
    token logits at [:, -1], and decode steps append in one shared cache column. Positions count real tokens
    only (row i's first real token is position 0) and padding keys are masked out, so a padded row computes
    exactly what it would alone."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], room: int, *, slots: int | None = None,
                 session: Session | None = None, fast: bool = False):
        p = next(model.parameters())
        B, T = len(prompts), max(len(x) for x in prompts)
        self.model, self.T = model, T
        # fast: decode steps may run a DecodeView (packed weights, fast_linear.py), decided at the first step
        # so that packing is not part of the time to first token; `room` bounds the decode steps
        self.fast, self.view, self.room = fast, None, room
        self.ids = torch.zeros(B, T, dtype=torch.long)
        self.mask = torch.ones(B, slots or T + room, dtype=torch.bool)               # (B, keys)
        for i, x in enumerate(prompts):
            self.ids[i, T - len(x):] = torch.tensor(x)
            self.mask[i, : T - len(x)] = False
        self.ids, self.mask = self.ids.to(p.device), self.mask.to(p.device)
        self.padded = any(len(x) < T for x in prompts)
        self.pos = torch.tensor([len(x) for x in prompts], device=p.device)         # next position per row
        self.session, self.reused = session, 0
        if session is not None:  # one prompt: continue from the kept cache, prefill only what differs
            self.cache, self.reused = session._take(model, prompts[0])
        else:
            self.cache = KVCache.for_model(model, B, slots or T + room)
        # the padding mask as the model's 4-D form (B, 1, 1, keys), built once: a decode step slices it
        self.mask4 = self.mask[:, None, None, :]

    def prefill(self) -> torch.Tensor:
        h = self.model.features(self.ids[:, self.reused:],
                                attention_mask=self.mask[:, : self.T] if self.padded else None,
                                cache=self.cache)                                     # (B, T, C)
        if self.session is not None:
            self.session._prefilled(self.ids[0].tolist(), self.reused)
        return self.model.lm_logits(h[:, -1]).float()                                 # (B, V): last row only

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.fast:
            self.fast = False
            if fast_linear.worth_packing(self.model, len(tokens), self.room):
                self.view = fast_linear.DecodeView(self.model, len(tokens))
        model = self.view or self.model
        keys = self.cache.pos + 1
        h = model.features(tokens[:, None], attention_mask=self.mask4[..., :keys] if self.padded else None,
                           positions=self.pos[:, None], cache=self.cache)             # (B, 1, C)
        self.pos = self.pos + 1
        if self.session is not None:
            self.session.ids.append(int(tokens[0]))
        return model.lm_logits(h[:, -1]).float()

    def select(self, index: torch.Tensor) -> None:
        self.cache.select(index)
        self.mask, self.pos = self.mask.index_select(0, index), self.pos.index_select(0, index)
        self.mask4 = self.mask[:, None, None, :]


class CompiledDecoderBatch(DecoderBatch):
    """A DecoderBatch whose decode steps run one compiled function of fixed shapes (see CompiledStep).

    The cache spans the whole context; a step writes at the tensor `slot` and attends over the slots
    written so far, under a 4-D mask that is False for padding. That key count is the one size that changes
    per step: it is marked dynamic, so one compilation serves every step (attending over all context slots
    instead would cost ~2x the attention at batch 8). The positions are tensors. Rows keep their place when
    their sequence finishes (a smaller batch would be a new shape, so a new compilation): finished rows are
    still computed, and only the live rows' logits are returned."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], step_fn, *, session: Session | None = None):
        super().__init__(model, prompts, 0, slots=model.config.context_length, session=session)
        self.step_fn, self.first = step_fn, True
        self.mask[:, self.T:] = False        # slots after the prompt are unwritten until their step
        self.slot = torch.tensor([self.T], device=self.mask.device)                  # (1,) next slot
        self.pos = self.pos[:, None].contiguous()                                     # (B, 1)
        self.rows: torch.Tensor | None = None    # live rows (batch indices), None = all
        self.tokens = torch.zeros(len(prompts), 1, dtype=torch.long, device=self.mask.device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.first:  # once per generate call: see CompiledStep.refresh
            self.step_fn.refresh()
            self.first = False
        if self.rows is None:
            self.tokens[:, 0] = tokens
        else:
            self.tokens.index_copy_(0, self.rows, tokens[:, None])
        self.mask.index_fill_(1, self.slot, True)
        mask = self.mask4[..., : self.cache.pos + 1]
        torch._dynamo.mark_dynamic(mask, 3)
        try:
            logits = self.step_fn(self.tokens, self.pos, self.slot, mask, self.cache.k, self.cache.v)
        except torch._dynamo.exc.TorchDynamoException as e:  # compilation runs on the first call
            raise GlassmindError(f"compiling the decode step failed ({type(e).__name__}); generate without "
                                 "compile=True / --compile (is a C++ compiler installed?)") from e
        self.pos += 1
        self.slot += 1
        self.cache.pos += 1
        if self.session is not None:
            self.session.ids.append(int(tokens[0]))
        return logits if self.rows is None else logits.index_select(0, self.rows)

    def select(self, index: torch.Tensor) -> None:
        self.rows = index if self.rows is None else self.rows.index_select(0, index)


_generations = itertools.count()  # weight snapshots of compiled steps, unique in the process


def compile_options(model: nn.Module) -> dict[str, Any]:
    """inductor options for CompiledStep: freezing and the C++ wrapper always, the AMX-tuned extras only
    for a bf16 model on a CPU whose torch computes bf16 natively with AMX."""
    # bf16 only (measured per step, one thread, batch 1 / 8): concat_linear turns q, k, v into one product
    # (-10% / -10%: oneDNN's fixed cost per call dominates such small products) and max-autotune with
    # inductor's C++ GEMM template replaces oneDNN's calls with generated AMX kernels (a further -34% /
    # -31%), at ~30 s more compilation per batch size. In fp32 neither helps (concat: +15% at batch 8 with
    # MKL; autotune: +-2%), so fp32 keeps the shorter compile. Those bf16 numbers are AMX numbers: a CPU
    # whose torch has no native bf16 (AVX2; AMX hidden) keeps the plain compile too (cpu_has_amx_bf16).
    options: dict[str, Any] = {"freezing": True, "cpp_wrapper": True}
    weight = next(model.parameters())
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and cpu_has_amx_bf16():
        options.update({"cpp.enable_concat_linear": True, "max_autotune": True,
                        "max_autotune_gemm_backends": "CPP,ATEN",
                        "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False})
    return options


class CompiledStep:
    """One decode step of a decoder, compiled with torch.compile (inductor) from outside the model.

    (tokens (B, 1), positions (B, 1), slot (1,), mask (B, 1, 1, keys), k, v: per-layer cache buffers
    (B, H_kv, max_len, D)) -> next-token logits (B, V) float. The caller marks `keys` dynamic; every other
    shape is fixed, so it compiles once per batch size. `cpp_wrapper` calls the kernels from generated C++
    rather than Python, which removes most of the per-op overhead at batch 1 on CPU.

    `freezing` makes the weights constants of the compiled code, so that inductor packs every linear's
    weight once for the CPU GEMM (MKL in fp32, oneDNN/AMX in bf16): 1.3-1.5x faster steps at batch 8 and in
    bf16 (benchmarks/RESULTS.md). torch 2.13 freezes the parameters of a module that the compiled function
    closes over only while dynamo's `prepare_freezing` flag is on (without it they stay graph inputs and
    nothing is packed), hence the flag around every call (compilation happens inside a call).

    Constants go stale when the weights change, and dynamo reuses a compiled step function for any later
    one over the same model (its cache belongs to the code object). So the step also takes `generation`, an
    int that dynamo specialises on: refresh(), called once per generate call, compares the weights with the
    copy taken when they were frozen and, if any differs, moves to a new generation, i.e. a recompilation
    (seconds to a minute). A new CompiledStep starts a new generation too. Version counters cannot replace
    the comparison: a fused AdamW step changes the weights in place without bumping them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.generation = next(_generations)
        self.frozen: list[torch.Tensor] | None = None   # the weights as the current generation froze them

        def step(tokens, positions, slot, mask, k, v, generation):
            # read `generation`, or dynamo would not guard on its value and a new one would not recompile
            assert generation >= 0
            cache = StaticKVCache(k, v, slot, mask.shape[-1])
            h = model.decoder(model.token_embedding(tokens), positions, key_mask=mask, cache=cache)  # (B, 1, C)
            return model.lm_logits(h[:, -1]).float()

        options = compile_options(model)
        self.fn = torch.compile(step, fullgraph=True, dynamic=False, options=options)

    def refresh(self) -> None:
        """Start a new generation if the weights differ from those the current one froze (~1.3 ms per 10 MB)."""
        now = [*self.model.parameters(), *self.model.buffers()]
        if self.frozen is not None and len(now) == len(self.frozen) and all(
                _same_bits(p, f) for p, f in zip(now, self.frozen)):
            return
        if self.frozen is not None:
            self.generation = next(_generations)
        self.frozen = [p.detach().clone() for p in now]

    def __call__(self, tokens, positions, slot, mask, k, v) -> torch.Tensor:
        config = torch._dynamo.config  # set and restored by hand: config.patch() costs ~20 us per step
        if not hasattr(config, "prepare_freezing"):  # a torch without the flag: compile as it does by default
            return self.fn(tokens, positions, slot, mask, k, v, self.generation)
        before, config.prepare_freezing = config.prepare_freezing, True
        try:
            return self.fn(tokens, positions, slot, mask, k, v, self.generation)
        finally:
            config.prepare_freezing = before


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (a NaN equals itself). Compared as int64 words where the size allows: 4x faster
    than torch.equal on float tensors on this CPU (1 ms vs 4 ms for 8 MB)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_contiguous() and b.is_contiguous() and a.numel() * a.element_size() % 8 == 0:
        return torch.equal(a.reshape(-1).view(torch.int64), b.reshape(-1).view(torch.int64))
    return torch.equal(a, b)



class Seq2SeqBatch:
    """A batch of encoder-decoder sources: the encoder runs once in prefill; the cross-attention keys and
    values of its output are computed on the first decoder call and kept in the cache."""

    def __init__(self, model: nn.Module, sources: list[list[int]], start_id: int, room: int):
        p = next(model.parameters())
        B, S = len(sources), max(len(x) for x in sources)
        self.model = model
        self.src = torch.zeros(B, S, dtype=torch.long)
        self.src_mask = torch.zeros(B, S, dtype=torch.bool)                           # right padding
        for i, x in enumerate(sources):
            self.src[i, : len(x)] = torch.tensor(x)
            self.src_mask[i, : len(x)] = True
        self.src, self.src_mask = self.src.to(p.device), self.src_mask.to(p.device)
        self.padded = any(len(x) < S for x in sources)
        self.start = torch.full((B, 1), start_id, dtype=torch.long, device=p.device)
        self.cache = KVCache.for_model(model, B, 1 + room)

    def _src_mask(self) -> torch.Tensor | None:
        return self.src_mask if self.padded else None

    def prefill(self) -> torch.Tensor:
        memory = self.model.encode(self.src, self._src_mask())                        # (B, S, C)
        logits = self.model.decode(self.start, memory, src_mask=self._src_mask(), cache=self.cache)
        return logits[:, -1].float()                                                  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode(tokens[:, None], None, src_mask=self._src_mask(), cache=self.cache)
        return logits[:, -1].float()

    def select(self, index: torch.Tensor) -> None:
        self.cache.select(index)
        self.src_mask = self.src_mask.index_select(0, index)


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

    def _batch(self, prompts: list[list[int]], room: int, params: SamplingParams, session: Session | None):
        if self.config.arch == "encoder-decoder":
            return Seq2SeqBatch(self.model, prompts, self.decoder_start_token_id, room)  # type: ignore[arg-type]
        if params.strategy == "beam":  # beams are reordered copies of caches: nothing to keep, no fixed shape
            if session is not None:
                session.reset()
            return DecoderBatch(self.model, prompts, room, fast=self.packed)
        if self._step is not None:
            return CompiledDecoderBatch(self.model, prompts, self._step, session=session)
        return DecoderBatch(self.model, prompts, room, session=session, fast=self.packed)

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
        B, N, V = len(prompts), params.top_logprobs, self.config.vocab_size
        eos = frozenset(params.eos_token_ids)
        stops = tuple(tuple(s) for s in params.stop_sequences)
        greedy = params.is_greedy
        out: list[_Partial] = [_Partial() for _ in range(B)]
        alive = list(range(B))                     # prompt index of each batch row
        logits = batch.prefill()                                                       # (B, V)
        device = logits.device
        gens = None if greedy else make_generators(params.seed, B, device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, V, dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                seen[i, p] = True
        while True:
            scores = process(logits, params, seen)
            if greedy:
                tok = scores.max(-1).indices  # (b,); the first maximum, as argmax, at half its CPU cost
            else:
                tok = sample(scores, [gens[i] for i in alive])  # type: ignore[index]
            raw = logits.log_softmax(-1)  # the model's own distribution (faster on CPU than logsumexp)
            tok_lp = raw.gather(-1, tok[:, None])[:, 0]                                # (b,)
            toks, lps = tok.tolist(), tok_lp.tolist()
            tops: list[list[tuple[int, float]]] = [[] for _ in alive]
            if N:
                top_lp, top_id = raw.topk(N, dim=-1)
                tops = [list(zip(i, lp)) for i, lp in zip(top_id.tolist(), top_lp.tolist())]
            now = time.perf_counter()
            keep = []
            for r, i in enumerate(alive):
                o = out[i]
                o.add(toks[r], lps[r], tops[r], now)
                n = stop_length(o.ids, eos, stops)
                reason = "stop" if n else (reasons[i] if len(o.ids) >= max_new[i] else None)
                result = None
                if reason is not None:
                    result = self._result(prompts[i], o.ids, o.logprobs, o.tops, reason, n, t0, o.times,
                                          reused=getattr(batch, "reused", 0))
                else:
                    keep.append(r)
                yield StreamEvent(i, toks[r], lps[r], tops[r], reason, result)
            if not keep:
                return
            if len(keep) < len(alive):         # finished rows leave the batch: no more compute for them
                idx = torch.tensor(keep, device=device)
                batch.select(idx)
                tok = tok.index_select(0, idx)
                seen = seen.index_select(0, idx) if seen is not None else None
                alive = [alive[r] for r in keep]
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
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
