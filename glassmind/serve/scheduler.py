"""The scheduler: one thread owns a model's RunningBatch and runs continuous batching for every request.

    loop:  drop cancelled rows  ->  admit waiting requests that fit (one prefill for all newcomers)
           ->  one decode step for every running row  ->  rows that finished leave the batch
           ->  between steps: jobs that need the model alone (the autopsy)

A request is one prompt x n choices, or several prompts (a completions batch); each choice is a row with its
own settings, seed (seed + choice index, as Engine seeds sequence i) and stop conditions. Rows leave the
batch the step they finish, so no request waits for another to end. The HTTP side (app.py) talks to this
thread through `submit` (raises QueueFull at once when `max_queue` requests wait), `cancel` (a client that
went away: its rows leave before the next step) and the per-request event queue, fed with
`loop.call_soon_threadsafe` so the asyncio side never blocks on the model.

Text is made here, not in the HTTP handler, because a stop string must end the row (and free its slot) the
step it appears: each row has a Detokenizer and a StopMatcher that holds back text which could still become
a stop string.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from glassmind.infer.continuous import BatchSampler, Choice, RowSampler, RunningBatch
from glassmind.infer.detok import Detokenizer
from glassmind.infer.sampling import SamplingParams


class QueueFull(Exception):
    """max_queue requests are already waiting: the caller answers 429 with Retry-After."""


class StopMatcher:
    """Text stop strings over a stream of text pieces: `push(piece) -> (text to emit now, stopped)`.

    Emitted text never contains a stop string; text that is a prefix of one is held back until it is
    decided (the OpenAI API returns the text before the stop string, without it)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = 0  # the longest suffix of text that starts some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return rest


@dataclass
class Event:
    """One new token of one choice (index), or its end (finish_reason set; token None if it ended without
    a token, e.g. the flush of held-back text)."""

    index: int
    token: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RowSpec:
    prompt: list[int]
    index: int            # the choice index in the response
    seed_offset: int      # added to the request's seed (choice j of a prompt: j)


_ids = itertools.count()


class Request:
    """What the HTTP side submits. `events` receives, on `loop`, one list of Events per decode step (a None in
    it ends the request)."""

    def __init__(self, rows: list[RowSpec], params: SamplingParams, max_new: list[int], *, stops=(),
                 ignore_eos: bool = False, kind: str = "cmpl", loop: asyncio.AbstractEventLoop | None = None):
        self.id = f"{kind}-{next(_ids)}"
        self.rows, self.params, self.max_new = rows, params, max_new
        self.stops, self.ignore_eos = tuple(stops), ignore_eos
        self.loop = loop
        self.events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.cancelled = False
        self.arrived = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.live = len(rows)
        self.generated = 0
        self.error: str | None = None

    def emit(self, evs: list) -> None:
        """Hand over this step's events (None ends the request)."""
        if self.loop is not None and not self.cancelled:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, evs)
            except RuntimeError:  # the event loop is gone (server shutting down)
                self.cancelled = True


class _Row:
    def __init__(self, req: Request, spec: RowSpec, sampler: RowSampler, detok: Detokenizer, max_new: int,
                 eos: frozenset[int]):
        self.req, self.spec, self.sampler, self.detok = req, spec, sampler, detok
        self.stop = StopMatcher(req.stops)
        self.max_new, self.eos = max_new, eos
        self.n = 0
        self.pending: int | None = None


class Scheduler:
    """Continuous batching over one model. Start with start(); stop with close()."""

    def __init__(self, name: str, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 eos_ids: tuple[int, ...] = (), metrics=None, compiled=None):
        self.name, self.model, self.tok = name, model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = frozenset(eos_ids)
        self.metrics = metrics
        self.vocab = model.config.vocab_size
        self.device = next(model.parameters()).device
        self.compiled = compiled       # a CompiledStep for the decode steps (serve --compile), or None
        self.batch = RunningBatch(model, compiled=compiled, packed=compiled is None)
        self.sampler = BatchSampler(self.vocab, self.device)    # the rows' settings, row for row with the batch
        self.rows: list[_Row] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self.jobs: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self.cv = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=f"glassmind-scheduler-{name}", daemon=True)
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self.steps = 0

    # -- the HTTP side ------------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.thread.join(timeout=5)

    def submit(self, req: Request) -> None:
        if len(req.rows) > self.max_batch:
            raise ValueError(f"{len(req.rows)} choices exceed the batch ({self.max_batch} rows)")
        with self.cv:
            if len(self.waiting) >= self.max_queue:   # clients that left while waiting hold no place
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull()
            self.waiting.append(req)
            self.cv.notify_all()
        if self.metrics:
            self.metrics.waiting(self.name, len(self.waiting))

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self.cv:
            self.cv.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn in the scheduler thread between two decode steps (it has the model to itself)."""
        fut: Future = Future()
        with self.cv:
            self.jobs.append((fn, fut))
            self.cv.notify_all()
        return fut

    def snapshot(self) -> dict:
        """The live view: which request sits in which slot, the queue, tokens/s over the last 5 s."""
        rows = list(self.rows)
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= 5.0]
        span = now - recent[0][0] if recent else 0.0
        tps = sum(n for _, n in recent) / span if span > 0.5 else 0.0
        return {"model": self.name, "max_batch": self.max_batch, "max_queue": self.max_queue, "steps": self.steps,
                "slots": [{"slot": i, "request": r.req.id, "choice": r.spec.index, "tokens": r.n}
                          for i, r in enumerate(rows)],
                "waiting": [q.id for q in list(self.waiting)], "tokens_per_s": round(tps, 1)}

    @property
    def running_requests(self) -> int:
        return len({id(r.req) for r in list(self.rows)})

    # -- the thread -------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while not (self.closed or self.waiting or self.rows or self.jobs):
                    self.cv.wait()
                if self.closed:
                    break
                jobs = list(self.jobs)
                self.jobs.clear()
                newcomers = []
                free = self.max_batch - len(self.rows)
                while self.waiting and (self.waiting[0].cancelled or len(self.waiting[0].rows) <= free):
                    req = self.waiting.popleft()
                    if not req.cancelled:
                        newcomers.append(req)
                        free -= len(req.rows)
            try:
                for fn, fut in jobs:
                    self._job(fn, fut)
                self._drop_cancelled()
                if newcomers:
                    self._admit(newcomers)
                if self.rows:
                    self._step()
            except Exception as e:  # a bug must not kill the server silently: fail the affected requests
                traceback.print_exc()
                for r in self.rows:
                    r.req.error = f"internal error in the scheduler: {type(e).__name__}"
                    r.req.emit([None])
                self.rows = []
                self.batch = RunningBatch(self.model, compiled=self.compiled, packed=self.compiled is None)
                self.sampler = BatchSampler(self.vocab, self.device)
            if self.metrics:
                self.metrics.waiting(self.name, len(self.waiting))
                self.metrics.running(self.name, self.running_requests)
        for r in self.rows:
            r.req.emit([None])
        for req in self.waiting:
            req.emit([None])

    def _job(self, fn, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to the caller, who turns it into an answer
            fut.set_exception(e)

    def _drop_cancelled(self) -> None:
        # read `cancelled` once per row: the event loop may cancel a request between two reads, and the batch
        # and the rows must lose exactly the same rows
        gone = [i for i, r in enumerate(self.rows) if r.req.cancelled]
        if gone:
            reqs = {id(self.rows[i].req) for i in gone}
            self.batch.remove(gone)
            self.sampler.remove(gone)
            drop = set(gone)
            self.rows = [r for i, r in enumerate(self.rows) if i not in drop]
            if self.metrics:
                for _ in reqs:
                    self.metrics.finished(self.name, "cancelled")

    def _admit(self, reqs: list[Request]) -> None:
        now = time.perf_counter()
        new: list[_Row] = []
        for req in reqs:
            req.admitted = now
            if self.metrics:
                self.metrics.queued(self.name, now - req.arrived)
                self.metrics.prompt_tokens(self.name, sum(len(s.prompt) for s in req.rows))
            eos = frozenset() if req.ignore_eos else self.eos
            for spec, max_new in zip(req.rows, req.max_new):
                sampler = RowSampler(req.params, spec.prompt, self.vocab, self.device, seed_offset=spec.seed_offset,
                                     max_new=max_new)
                new.append(_Row(req, spec, sampler, Detokenizer(self.tok), max_new, eos))
        logits = self.batch.admit([r.spec.prompt for r in new])
        sampler = BatchSampler.of([r.sampler for r in new], self.vocab, self.device)
        picks = sampler.choose(logits)       # the newcomers' first tokens, then they join the running rows
        self.sampler.append(sampler)
        self.rows += new
        self._take(picks, new, len(self.rows) - len(new))

    def _step(self) -> None:
        tokens = torch.tensor([r.pending for r in self.rows], dtype=torch.long)
        logits = self.batch.step(tokens)
        self._take(self.sampler.choose(logits), self.rows, 0)

    def _take(self, picks: list[Choice], rows: list[_Row], offset: int) -> None:
        """Hand each row's new token to its request; rows that finished leave the batch."""
        now = time.perf_counter()
        done: list[int] = []
        out: dict[int, tuple[Request, list]] = {}
        for j, (c, row) in enumerate(zip(picks, rows)):
            req = row.req
            row.n += 1
            row.pending = c.token
            req.generated += 1
            if req.first_token is None:
                req.first_token = now
                if self.metrics:
                    self.metrics.ttft(self.name, now - req.arrived)
            elif self.metrics and req.last_token is not None and req.last_token != now:
                self.metrics.itl(self.name, now - req.last_token)
            req.last_token = now
            reason = None
            if c.token in row.eos:
                reason, text = "stop", ""
            else:
                text, stopped = row.stop.push(row.detok.push(c.token))
                if stopped:
                    reason = "stop"
                elif row.n >= row.max_new:
                    reason = "length"
                    text += row.stop.push(row.detok.flush())[0] + row.stop.flush()
            evs = out.setdefault(id(req), (req, []))[1]
            evs.append(Event(row.spec.index, c.token, text, c.logprob, c.top_logprobs, reason))
            if reason is not None:
                done.append(offset + j)
                req.live -= 1
                if req.live == 0:
                    evs.append(None)
                    if self.metrics:
                        self.metrics.finished(self.name, "ok", e2e=now - req.arrived)
        self.steps += 1
        self.recent.append((now, len(picks)))
        while self.recent and now - self.recent[0][0] > 5.0:
            self.recent.popleft()
        if self.metrics:
            self.metrics.generation_tokens(self.name, len(picks))
            self.metrics.occupancy(self.name, len(self.rows), self.max_batch)
        for req, evs in out.values():   # after the counts: a client that reads /metrics next sees its tokens
            req.emit(evs)
        if done:
            self.batch.remove(done)
            self.sampler.remove(done)
            gone = set(done)
            self.rows = [r for i, r in enumerate(self.rows) if i not in gone]
