"""Continuous batching: decoder rows that join a running batch between decode steps and leave it when done.

Engine.generate runs one call's prompts from prefill to the last token; a server cannot wait for that, so a
request that arrives while others are decoding must join them at the next step (Yu et al. 2022, Orca,
"iteration-level scheduling"). `RunningBatch` is that seam, below the scheduler (glassmind/serve/):

    batch = RunningBatch(model)
    logits = batch.admit([prompt_a, prompt_b])    # prefill the newcomers, merge them in: (2, V)
    logits = batch.step(tokens)                   # one token per row in, next-token logits (B, V) out
    batch.remove([0])                             # a finished (or cancelled) row leaves; its cache goes too

Layout. Every row's keys/values end in the same cache column `col` (left padding, as DecoderBatch): row r
holds its `lens[r]` tokens in slots [col - lens[r], col) and the slots before are masked out. A newcomer
prefilled with T tokens is placed at [col - T, col); if T > col, every running row first moves right by
T - col. When `col` reaches the cache's end, the columns no row uses (before the longest row) are cut off:
the longest row is shorter than the context (the scheduler stops a row there), so a cut always frees a slot.
Positions are per row (the count of its real tokens), so a row computes what it would alone (to rounding:
the batch size changes the matmul's blocking).

`BatchSampler` chooses every row's next token with that row's own settings (greedy or sampled, temperature,
top-k/p, min-p, repetition penalty, its own seeded uniforms: a `RowSampler` per row when it joins) in batched
tensor ops over the whole batch, and reports the raw log-probabilities. Engine.generate samples with it too,
so a row of a running batch and the same prompt generated alone choose the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from glassmind.common import GlassmindError
from glassmind.infer import fast_linear
from glassmind.infer.batch import DecoderBatch
from glassmind.infer.kv_cache import KVCache
from glassmind.infer.sampling import SamplingParams, draw, make_generators, uniforms


class RunningBatch:
    """Rows of a decoder's generation that join (admit) and leave (remove) between decode steps."""

    def __init__(self, model: nn.Module, capacity: int | None = None, *, compiled=None, packed: bool = False):
        cfg = model.config
        if cfg.arch != "decoder":
            raise GlassmindError(f"continuous batching runs decoders; this model is a {cfg.arch}")
        self.model = model
        self.capacity = capacity or cfg.context_length
        # compiled: a compiled.CompiledStep for the decode steps (see step); None: the model, eagerly
        self.compiled = compiled
        # packed: eager decode steps through fast_linear's DecodeView (weights packed once for the GEMM kernel
        # of this dtype), one view per power-of-two batch size (MKL's fp32 packing is laid out for a row
        # count; padding 4 rows to 16 would cost more than it saves), made when first needed and kept: a
        # server's weights do not change. Where fast_linear finds no kernel worth it, the model itself.
        self.packed = packed
        self._views: dict[int, object] = {}
        if compiled is not None and self.capacity != cfg.context_length:
            raise GlassmindError("internal: a compiled step needs the cache to span the whole context")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # a compiled step's cache and mask have one slot more than is ever used: it reads the first
        # col + 1 <= capacity slots, and a slice as long as the whole buffer would be specialised (a size equal
        # to a constant, a contiguous mask) when the column reaches the context's end: dynamo's refusal of a
        # size marked dynamic, or a recompilation
        slots = self.capacity + (compiled is not None)
        with torch.inference_mode():   # inference tensors from the start (see remove)
            self.cache = KVCache.for_model(model, 0, slots)                          # (0, H_kv, slots, D)
            self.mask = torch.zeros(0, slots, dtype=torch.bool, device=self.device)  # (B, slots) real keys
            self.pos = torch.zeros(0, dtype=torch.long, device=self.device)          # (B,) next position
        self.lens: list[int] = []                                                     # tokens cached per row

    @property
    def size(self) -> int:
        return len(self.lens)

    @property
    def col(self) -> int:
        return self.cache.pos

    # -- joining ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def admit(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill `prompts` (one left-padded forward) and append them as the last rows; their next-token
        logits (n, V) float. Each prompt must leave room for one new token in the context."""
        limit = self.capacity - 1
        for p in prompts:
            if not 1 <= len(p) <= limit:
                raise GlassmindError(f"a prompt of {len(p)} tokens does not fit: 1..{limit} leave room for a reply")
        new = DecoderBatch(self.model, [list(p) for p in prompts], 0)
        logits = new.prefill()                                                        # (n, V)
        T = new.T
        if T > self.col:
            self._shift(T - self.col)
        col, n = self.col, len(prompts)
        for layer in range(len(self.cache.k)):
            for buf, src in ((self.cache.k, new.cache.k), (self.cache.v, new.cache.v)):
                rows = torch.zeros((n, *buf[layer].shape[1:]), dtype=buf[layer].dtype, device=self.device)
                rows[:, :, col - T: col] = src[layer][:, :, :T]
                buf[layer] = torch.cat([buf[layer], rows])
        mask = torch.zeros(n, self.mask.shape[1], dtype=torch.bool, device=self.device)
        mask[:, col - T: col] = new.mask[:, :T]
        self.mask = torch.cat([self.mask, mask])
        self.pos = torch.cat([self.pos, new.pos])
        self.lens += [len(p) for p in prompts]
        return logits

    def _shift(self, s: int) -> None:
        """Move every row's slots right by s (the cache's leading columns become padding)."""
        col = self.col
        if col + s > self.capacity:
            raise GlassmindError("internal: shift past the cache's end")
        for buf in (self.cache.k, self.cache.v):
            for layer, t in enumerate(buf):
                moved = torch.zeros_like(t)
                moved[:, :, s: s + col] = t[:, :, :col]
                buf[layer] = moved
        mask = torch.zeros_like(self.mask)
        mask[:, s: s + col] = self.mask[:, :col]
        self.mask = mask
        self.cache.pos = col + s

    def _compact(self) -> None:
        """Cut the leading columns that no row uses (every row keeps its slots, moved left)."""
        cut = self.col - max(self.lens, default=0)
        if cut <= 0:
            raise GlassmindError("internal: a row fills the whole cache (the scheduler must stop it first)")
        col = self.col
        for buf in (self.cache.k, self.cache.v):
            for layer, t in enumerate(buf):
                moved = torch.empty_like(t)
                moved[:, :, : col - cut] = t[:, :, cut:col]
                buf[layer] = moved
        mask = torch.zeros_like(self.mask)
        mask[:, : col - cut] = self.mask[:, cut:col]
        self.mask = mask
        self.cache.pos = col - cut

    # -- stepping and leaving ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) long; the next-token logits (B, V) float."""
        if tokens.shape != (self.size,):
            raise GlassmindError(f"step needs one token per row: {self.size} rows, got shape {tuple(tokens.shape)}")
        if self.size == 0:
            raise GlassmindError("step on an empty batch")
        if self.col >= self.capacity:
            self._compact()
        col = self.col
        self.mask[:, col] = True
        mask4 = self.mask[:, None, None, : col + 1]                                  # (B, 1, 1, keys)
        if self.compiled is not None:
            # a copy made here is an inference tensor whoever made `tokens` (see remove: no recompilation)
            logits = self._compiled_step(tokens.to(self.device)[:, None].clone(), mask4, col)
        else:
            m = self._decoder(tokens.shape[0])
            h = m.features(tokens.to(self.device)[:, None], attention_mask=mask4,
                           positions=self.pos[:, None], cache=self.cache)            # (B, 1, C)
            logits = m.lm_logits(h[:, -1]).float()
        self.pos = self.pos + 1
        self.lens = [n + 1 for n in self.lens]
        return logits

    def _decoder(self, rows: int):
        """The module a decode step of `rows` rows runs: the model, or its packed view (see __init__)."""
        if not self.packed:
            return self.model
        bucket = 1 << max(rows - 1, 0).bit_length()                                  # 1, 2, 4, 8, 16, ...
        if bucket not in self._views:
            worth = fast_linear.worth_packing(self.model, bucket, fast_linear.PACK_MIN_STEPS)
            self._views[bucket] = fast_linear.DecodeView(self.model, bucket) if worth else self.model
        return self._views[bucket]

    def _compiled_step(self, tokens: torch.Tensor, mask4: torch.Tensor, col: int) -> torch.Tensor:
        """One decode step through the CompiledStep: the same cache buffers (B, H_kv, capacity, D), written at
        the slot `col`, under the same mask. Two sizes change from step to step here: the keys (col + 1, as in
        the engine's compiled batch) and the rows (requests join and leave), so both are marked dynamic and
        one compilation serves every batch of 2 rows or more; a batch of 1 is a second one (dynamo
        specialises a size of 1). Without the marks, each new batch size would compile anew (~10-30 s)."""
        pos = self.pos[:, None]                                                       # (B, 1)
        torch._dynamo.mark_dynamic(mask4, 3)
        if tokens.shape[0] > 1:
            for t in (tokens, pos, mask4, *self.cache.k, *self.cache.v):
                torch._dynamo.mark_dynamic(t, 0)
        slot = torch.tensor([col], device=self.device)
        try:
            logits = self.compiled(tokens, pos, slot, mask4, self.cache.k, self.cache.v)
        except torch._dynamo.exc.TorchDynamoException as e:  # compilation runs on the first call
            raise GlassmindError(f"compiling the decode step failed ({type(e).__name__}); serve without "
                                 "--compile (is a C++ compiler installed?)") from e
        self.cache.pos = col + 1
        return logits

    @torch.inference_mode()
    def remove(self, rows: list[int]) -> None:
        """Drop these row indices; the others keep their order. (In inference mode, as admit and step: every
        tensor of the batch stays an inference tensor, and a compiled step sees one kind of input; a mix
        recompiles it, since dynamo guards on the tensors' dispatch keys.)"""
        if not rows:
            return
        gone = set(rows)
        keep = [r for r in range(self.size) if r not in gone]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.select(index)
        self.mask = self.mask.index_select(0, index)
        self.pos = self.pos.index_select(0, index)
        self.lens = [self.lens[r] for r in keep]
        if not keep:
            self.cache.pos = 0


@dataclass
class Choice:
    """One row's pick: the token, its raw logprob and the top alternatives (id, logprob)."""

    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


class RowSampler:
    """One row's sampling settings, made when it joins: its params, the uniforms its sampled tokens are drawn
    at, and the tokens its repetition penalty reads (the prompt's). BatchSampler holds the rows of a batch.

    A row's seed s gives the same tokens as Engine.generate([prompt], SamplingParams(seed=s)) for the same
    settings (sampling.make_generators seeds sequence i with seed + i; a row is a sequence `seed_offset`):
    its generator draws its uniforms for all `max_new` tokens now (sampling.uniforms: a prefix of any longer
    draw), and its k-th sampled token is drawn at the k-th."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int, device: torch.device,
                 *, seed_offset: int = 0, max_new: int | None = None):
        params.validate(vocab_size)
        if params.strategy == "beam":
            raise GlassmindError("beam search does not run in a continuous batch: use Engine.generate")
        self.params = params
        self.greedy = params.is_greedy
        self.prompt = prompt
        n = max_new if max_new is not None else params.max_new_tokens
        self.u = torch.zeros(n, dtype=torch.float64, device=device)                   # (max_new,)
        if not self.greedy:
            seed = None if params.seed is None else params.seed + seed_offset
            self.u = uniforms(make_generators(seed, 1, device)[0], n).to(device)


class BatchSampler:
    """The sampling side of a batch: every row's settings as tensors, so that one step chooses every row's
    token with a fixed number of batched tensor ops whatever the rows' mix (no Python per row until the
    picks are handed out). Rows join (extend) and leave (remove) as the RunningBatch's rows do.

    Per row r (B rows, V tokens): greedy[r], temperature[r], top_k[r] (0 = off), top_p[r], min_p[r],
    penalty[r]; u (B, L) its uniforms, n[r] how many tokens it has drawn; seen (B, V) the tokens its
    repetition penalty reads (allocated once a row with a penalty joins). The processors run in transformers'
    order (sampling.process), each with its per-row parameter broadcast over the row; their results equal
    process() applied to the row alone, and the draw is sampling.draw at the row's next uniform."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.V, self.device = vocab_size, device
        self.params: list[SamplingParams] = []
        f32 = dict(dtype=torch.float32, device=device)
        self.greedy = torch.zeros(0, dtype=torch.bool, device=device)
        self.temperature = torch.zeros(0, **f32)
        self.top_k = torch.zeros(0, dtype=torch.long, device=device)
        self.top_p = torch.zeros(0, dtype=torch.float64, device=device)
        self.log_min_p = torch.zeros(0, **f32)
        self.penalty = torch.zeros(0, **f32)
        self.u = torch.zeros(0, 1, dtype=torch.float64, device=device)
        self.n = torch.zeros(0, dtype=torch.long, device=device)
        self.seen: torch.Tensor | None = None
        self._plan()

    @classmethod
    def of(cls, samplers: list[RowSampler], vocab_size: int, device: torch.device) -> "BatchSampler":
        """The rows `samplers`, in that order (Python per row here, once, when they join)."""
        b = cls(vocab_size, device)
        if not samplers:
            return b
        ps = [s.params for s in samplers]
        vec = lambda vals, dt: torch.tensor(vals, dtype=dt, device=device)  # noqa: E731
        b.greedy = vec([s.greedy for s in samplers], torch.bool)
        b.temperature = vec([1.0 if s.greedy else p.temperature for s, p in zip(samplers, ps)], torch.float32)
        b.top_k = vec([p.top_k for p in ps], torch.long)
        b.top_p = vec([p.top_p for p in ps], torch.float64)
        b.log_min_p = vec([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in ps], torch.float32)
        b.penalty = vec([p.repetition_penalty for p in ps], torch.float32)
        b.u = torch.zeros(len(samplers), max(len(s.u) for s in samplers), dtype=torch.float64, device=device)
        for i, s in enumerate(samplers):
            b.u[i, : len(s.u)] = s.u
        b.n = torch.zeros(len(samplers), dtype=torch.long, device=device)
        if any(p.repetition_penalty != 1.0 for p in ps):
            b.seen = torch.zeros(len(samplers), vocab_size, dtype=torch.bool, device=device)
            for i, s in enumerate(samplers):
                if s.params.repetition_penalty != 1.0:
                    b.seen[i, s.prompt] = True
        b.params = ps
        b._plan()
        return b

    @property
    def size(self) -> int:
        return len(self.params)

    def append(self, other: "BatchSampler") -> None:
        """Append other's rows, with their state (the newcomers that chose their first token at admission)."""
        if other.size == 0:
            return
        for name in ("greedy", "temperature", "top_k", "top_p", "log_min_p", "penalty", "n"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        L = max(self.u.shape[1], other.u.shape[1])
        def pad(u: torch.Tensor) -> torch.Tensor:   # (B, L') -> (B, L): unused uniforms are never read
            return u if u.shape[1] == L else torch.cat([u, u.new_zeros(u.shape[0], L - u.shape[1])], 1)

        self.u = torch.cat([pad(self.u), pad(other.u)])
        if self.seen is not None or other.seen is not None:
            none = lambda b: torch.zeros(b.size, self.V, dtype=torch.bool, device=self.device)  # noqa: E731
            self.seen = torch.cat([self.seen if self.seen is not None else none(self),
                                   other.seen if other.seen is not None else none(other)])
        self.params = self.params + other.params
        self._plan()

    def extend(self, samplers: list[RowSampler]) -> None:
        """Append these rows (after the current ones, as RunningBatch.admit appends)."""
        self.append(BatchSampler.of(samplers, self.V, self.device))

    def remove(self, rows: list[int]) -> None:
        """Drop these row indices; the others keep their order (as RunningBatch.remove)."""
        if not rows:
            return
        gone = set(rows)
        keep = [r for r in range(self.size) if r not in gone]
        self.select(torch.tensor(keep, dtype=torch.long, device=self.device))

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (B',) long, in that order."""
        for name in ("greedy", "temperature", "top_k", "top_p", "log_min_p", "penalty", "u", "n"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        self.params = [self.params[i] for i in index.tolist()]
        self._plan()

    def _plan(self) -> None:
        """Which processors this mix of rows needs (Python flags, recomputed only when rows join or leave)."""
        ps = self.params
        sampled = [i for i, p in enumerate(ps) if not p.is_greedy]
        self.sampled = None if len(sampled) == len(ps) else torch.tensor(sampled, dtype=torch.long,
                                                                         device=self.device)
        self.any_sampled = bool(sampled)
        sp = [ps[i] for i in sampled]
        self.any_temperature = any(p.temperature != 1.0 for p in sp)
        self.k_max = max((p.top_k for p in sp if 0 < p.top_k < self.V), default=0)
        self.top_p_rows = [j for j, p in enumerate(sp) if p.top_p < 1.0]   # positions among the sampled rows
        self.any_min_p = any(p.min_p > 0 for p in sp)
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in ps)
        self.n_top = max((p.top_logprobs for p in ps), default=0)

    # -- one step -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def choose(self, logits: torch.Tensor) -> list[Choice]:
        """Next token of every row of `logits` (B, V) float, row r by its own settings."""
        B, V = logits.shape
        if B != self.size:
            raise GlassmindError(f"internal: {B} rows of logits for {self.size} rows of settings")
        x, s = self.process(logits)
        toks = x.max(-1).indices            # greedy rows: the first maximum, as Engine's greedy    (B,)
        if s is not None:
            rows = self.sampled
            n = self.n if rows is None else self.n.index_select(0, rows)
            u = (self.u if rows is None else self.u.index_select(0, rows)).gather(1, n[:, None])[:, 0]
            drawn = draw(s, u)                                                        # (b,)
            toks = drawn if rows is None else toks.index_copy(0, rows, drawn)
            self.n += 1   # greedy rows count too; they never read their uniforms
        if self.seen is not None:
            self.seen.scatter_(1, toks[:, None], True)
        raw = logits.log_softmax(-1)        # the model's own distribution, as Engine reports   (B, V)
        lps = raw.gather(-1, toks[:, None])[:, 0]
        tok_list, lp_list = toks.tolist(), lps.tolist()
        if not self.n_top:
            return [Choice(t, lp, []) for t, lp in zip(tok_list, lp_list)]
        top_lp, top_id = raw.topk(self.n_top, dim=-1)
        top_lp, top_id = top_lp.tolist(), top_id.tolist()
        return [Choice(t, lp, list(zip(top_id[r], top_lp[r]))[: p.top_logprobs])
                for r, (t, lp, p) in enumerate(zip(tok_list, lp_list, self.params))]

    def process(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """sampling.process for every row at once: (every row's logits after its repetition penalty (B, V), the
        sampled rows' scores after temperature, top-k, top-p and min-p (b, V), or None when no row samples).
        The sampled rows are self.sampled (None: all rows)."""
        x = logits
        if self.any_penalty:   # CTRL's rule (sampling.apply_repetition_penalty); a penalty of 1 changes nothing
            pen = self.penalty[:, None]                                               # (B, 1)
            x = torch.where(self.seen, torch.where(x > 0, x / pen, x * pen), x)
        s = None
        if self.any_sampled:
            rows = self.sampled
            s = x if rows is None else x.index_select(0, rows)                        # (b, V)
            if self.any_temperature:
                temp = self.temperature if rows is None else self.temperature.index_select(0, rows)
                s = s / temp[:, None]
            if self.k_max:                  # exactly k per row (topk's order breaks ties), 0 = off
                k = self.top_k if rows is None else self.top_k.index_select(0, rows)
                idx = s.topk(self.k_max, dim=-1).indices                              # (b, k_max)
                ranks = torch.arange(self.k_max, device=s.device)[None]               # (1, k_max)
                keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, ranks < k[:, None])
                keep |= ((k == 0) | (k >= self.V))[:, None]
                s = s.masked_fill(~keep, float("-inf"))
            if self.top_p_rows:             # only the rows that ask for it pay for the sort
                j = torch.tensor(self.top_p_rows, dtype=torch.long, device=s.device)
                p = (self.top_p if rows is None else self.top_p.index_select(0, rows)).index_select(0, j)
                sub = s.index_select(0, j)
                probs, order = sub.double().softmax(-1).sort(dim=-1, descending=True)    # (t, V)
                keep_sorted = (probs.cumsum(-1) - probs) < p[:, None]
                keep_sorted[:, 0] = True
                keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
                s = s.index_copy(0, j, sub.masked_fill(~keep, float("-inf")))
            if self.any_min_p:              # log min_p = -inf keeps every token
                lm = self.log_min_p if rows is None else self.log_min_p.index_select(0, rows)
                s = s.masked_fill(s < s.max(-1, keepdim=True).values + lm[:, None], float("-inf"))
        return x, s
