"""Batches of sequences being decoded, and the protocol the engine's decode loops (and beam search) use.

    logits = batch.prefill()          # (B, V) next-token logits of every row after its prompt
    logits = batch.step(tokens)       # tokens (b,) long, one per live row -> (b, V) after feeding them
    batch.select(index)               # keep / reorder rows: index (b',) long into the current rows

Rows are the live sequences in order; `select` is how a finished sequence leaves the batch (greedy and
sampling) and how beams are reordered and copied (beam search). Implementations: DecoderBatch (eager, or
with packed weights), Seq2SeqBatch (encoder run once), compiled.CompiledDecoderBatch (one compiled step of
fixed shapes). A Session keeps one conversation's KV cache between generate calls.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn as nn

from glassmind.infer.kv_cache import KVCache


class DecodeBatch(Protocol):
    def prefill(self) -> torch.Tensor:
        """Run the prompts; next-token logits (B, V), float."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per live row (b,); next-token logits (b, V), float."""
        ...

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder, and repeat) the rows `index` (b',) of the current batch."""
        ...


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
                 session: Session | None = None, decode_model: Callable[[int], nn.Module] | None = None):
        p = next(model.parameters())
        B, T = len(prompts), max(len(x) for x in prompts)
        self.model, self.T = model, T
        # decode_model(rows) -> the module decode steps run (the Engine's choice: the model, or a view of it
        # with packed weights); called at the first step, so that packing is not part of the time to first
        # token, with the rows then alive
        self.decode_model, self.step_model = decode_model, None
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
        if self.step_model is None:
            self.step_model = self.decode_model(len(tokens)) if self.decode_model is not None else self.model
        model = self.step_model
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
