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

`RowSampler` chooses each row's next token with that row's own settings (greedy or sampled, temperature,
top-k/p, min-p, repetition penalty, its own seeded generator), the processors of sampling.py applied row by
row, and reports the raw log-probabilities exactly as Engine does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from glassmind.common import GlassmindError
from glassmind.infer.batch import DecoderBatch
from glassmind.infer.kv_cache import KVCache
from glassmind.infer.sampling import SamplingParams, make_generators, process, sample


class RunningBatch:
    """Rows of a decoder's generation that join (admit) and leave (remove) between decode steps."""

    def __init__(self, model: nn.Module, capacity: int | None = None):
        cfg = model.config
        if cfg.arch != "decoder":
            raise GlassmindError(f"continuous batching runs decoders; this model is a {cfg.arch}")
        self.model = model
        self.capacity = capacity or cfg.context_length
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache.for_model(model, 0, self.capacity)                      # (0, H_kv, cap, D)
        self.mask = torch.zeros(0, self.capacity, dtype=torch.bool, device=self.device)  # (B, cap) real keys
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)              # (B,) next position
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
        col, cap, n = self.col, self.capacity, len(prompts)
        for layer in range(len(self.cache.k)):
            for buf, src in ((self.cache.k, new.cache.k), (self.cache.v, new.cache.v)):
                rows = torch.zeros((n, *buf[layer].shape[1:]), dtype=buf[layer].dtype, device=self.device)
                rows[:, :, col - T: col] = src[layer][:, :, :T]
                buf[layer] = torch.cat([buf[layer], rows])
        mask = torch.zeros(n, cap, dtype=torch.bool, device=self.device)
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
        h = self.model.features(tokens.to(self.device)[:, None], attention_mask=mask4,
                                positions=self.pos[:, None], cache=self.cache)       # (B, 1, C)
        self.pos = self.pos + 1
        self.lens = [n + 1 for n in self.lens]
        return self.model.lm_logits(h[:, -1]).float()

    def remove(self, rows: list[int]) -> None:
        """Drop these row indices; the others keep their order."""
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
    """The per-row side of a continuous batch: each row's settings, generator and seen tokens.

    A row's seed s gives the same tokens as Engine.generate([prompt], SamplingParams(seed=s)) for the same
    settings (sampling.make_generators seeds sequence i with seed + i; a row is a sequence 0)."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int, device: torch.device,
                 *, seed_offset: int = 0):
        params.validate(vocab_size)
        if params.strategy == "beam":
            raise GlassmindError("beam search does not run in a continuous batch: use Engine.generate")
        self.params = params
        self.greedy = params.is_greedy
        self.gen = None
        if not self.greedy:
            seed = None if params.seed is None else params.seed + seed_offset
            self.gen = make_generators(seed, 1, device)[0]
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, prompt] = True

    def observe(self, token: int) -> None:
        if self.seen is not None:
            self.seen[0, token] = True


@torch.inference_mode()
def choose(logits: torch.Tensor, samplers: list[RowSampler]) -> list[Choice]:
    """Next token of every row of `logits` (B, V) float, row r by samplers[r]."""
    B = logits.shape[0]
    raw = logits.log_softmax(-1)                                                       # (B, V)
    toks = raw.new_empty(B, dtype=torch.long)
    plain = [r for r, s in enumerate(samplers) if s.greedy and s.seen is None]
    if plain:  # the common case, one vectorised argmax (the first maximum, as Engine's greedy)
        idx = torch.tensor(plain, device=logits.device)
        toks[idx] = logits.index_select(0, idx).max(-1).indices
    groups: dict[tuple, list[int]] = {}   # sampled rows without a penalty, by their processors' settings
    for r, s in enumerate(samplers):
        if s.greedy and s.seen is None:
            continue
        if s.greedy or s.seen is not None:   # a penalty reads the row's own history: one row at a time
            scores = process(logits[r: r + 1], s.params, s.seen)
            toks[r] = scores.max(-1).indices[0] if s.greedy else sample(scores, [s.gen])[0]
            continue
        p = s.params
        groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(r)
    for rows in groups.values():  # one pass of the processors per group; each row draws with its generator
        idx = torch.tensor(rows, device=logits.device)
        scores = process(logits.index_select(0, idx), samplers[rows[0]].params)
        toks[idx] = sample(scores, [samplers[r].gen for r in rows])
    lps = raw.gather(-1, toks[:, None])[:, 0].tolist()
    N = max((s.params.top_logprobs for s in samplers), default=0)
    tops: list[list[tuple[int, float]]] = [[] for _ in range(B)]
    if N:
        top_lp, top_id = raw.topk(N, dim=-1)
        top_lp, top_id = top_lp.tolist(), top_id.tolist()
        tops = [list(zip(top_id[r], top_lp[r]))[: s.params.top_logprobs] for r, s in enumerate(samplers)]
    out = []
    for r, (t, s) in enumerate(zip(toks.tolist(), samplers)):
        s.observe(t)
        out.append(Choice(t, lps[r], tops[r]))
    return out
