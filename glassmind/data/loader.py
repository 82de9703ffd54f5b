"""Batches of fixed-length windows cut from a token stream, in a seeded order, with a position that can be
saved and restored so that a resumed run gets the very next batch.

The stream (one split of the token shards, documents already joined by separator tokens) is cut into
windows `window` tokens long, `stride` apart: for causal LM window = T + 1 and stride = T, so consecutive
windows share one token and every token is a target exactly once per epoch (nanoGPT and nanochat pack the
same way: no padding, documents cross window edges, separated by their end-of-text token).

Order. Micro-batch g (a global index counting from 0 across all ranks) of epoch e = g // batches_per_epoch
holds windows perm_e[b*B : (b+1)*B], perm_e a permutation seeded by (seed, e). A batch is therefore a pure
function of g, and the loader's whole state is one counter: how many micro-batches have been consumed.

Ranks. Rank r of w takes micro-batches r, r + w, r + 2w, ...: together the ranks consume exactly the
sequence a single process would, so a run on w ranks with 1/w of the accumulation steps sees the same data.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from glassmind.common import GlassmindError, rank as get_rank, world_size as get_world_size


class TokenSource(Protocol):
    def __len__(self) -> int: ...

    def read(self, start: int, n: int) -> np.ndarray: ...


class ArrayTokens:
    """A TokenSource over an in-memory array (tests, small data)."""

    def __init__(self, array):
        self.array = np.asarray(array)

    def __len__(self) -> int:
        return len(self.array)

    def read(self, start: int, n: int) -> np.ndarray:
        return self.array[start : start + n]


class WindowLoader:
    def __init__(self, source: TokenSource, *, window: int, stride: int | None = None, batch_size: int,
                 seed: int = 0, shuffle: bool = True, rank: int | None = None, world_size: int | None = None):
        self.source = source if hasattr(source, "read") else ArrayTokens(source)
        self.window, self.stride, self.batch_size = window, stride or window, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        n = len(self.source)
        self.n_windows = (n - window) // self.stride + 1 if n >= window else 0
        self.batches_per_epoch = self.n_windows // batch_size  # a ragged last batch is dropped
        if self.batches_per_epoch == 0:
            raise GlassmindError(
                f"the data holds {n} tokens: too few for one batch of {batch_size} windows of {window} tokens; "
                "use more data (--data, --max-bytes), a shorter --context or a smaller --micro-batch")
        self.pos = 0  # micro-batches this rank has taken
        self._perm_epoch, self._perm = -1, None

    # -- random access -------------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                self._perm = np.arange(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, g: int) -> torch.Tensor:
        """Global micro-batch g: (batch_size, window) int64."""
        epoch, b = divmod(g, self.batches_per_epoch)
        windows = self._permutation(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        rows = [self.source.read(int(k) * self.stride, self.window) for k in windows]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def epoch_of(self, g: int) -> int:
        return g // self.batches_per_epoch

    # -- sequential use --------------------------------------------------------------------------------------
    def next(self) -> tuple[int, torch.Tensor]:
        """This rank's next micro-batch: (its global index g, the batch)."""
        g = self.pos * self.world_size + self.rank
        self.pos += 1
        return g, self.batch(g)

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        """The position as a count of global micro-batches consumed, plus what it is a position in."""
        return {"consumed": self.pos * self.world_size, "seed": self.seed, "window": self.window,
                "stride": self.stride, "batch_size": self.batch_size, "n_windows": self.n_windows,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "window", "stride", "batch_size", "n_windows", "shuffle"):
            if state.get(key) != mine[key]:
                raise GlassmindError(f"the saved loader position is for {key}={state.get(key)}, this loader has "
                                     f"{key}={mine[key]}: resume with the data and batch settings the run used")
        if state["consumed"] % self.world_size:
            raise GlassmindError(f"the run consumed {state['consumed']} micro-batches, not a multiple of "
                                 f"{self.world_size} ranks: resume with a world size that divides it")
        self.pos = state["consumed"] // self.world_size


def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The examples of optimizer step `step`: position g = step * batch + k of an endless stream that visits
    each of the n examples once per epoch, in an order permuted per epoch by (seed, epoch). A pure function
    of the step, so resuming needs nothing but the step."""
    out, perms = [], {}
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch = g // n
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(perms[epoch][g % n])
    return out
