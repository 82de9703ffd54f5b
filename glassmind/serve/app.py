"""The HTTP side: an OpenAI-compatible API, Prometheus metrics, glassmind's routes and the web page.

    GET  /v1/models                    the served runs
    POST /v1/completions               text in, text out (SSE with "stream": true, ending in [DONE])
    POST /v1/chat/completions          messages in (rendered in the run's chat format), a reply out
    GET  /health                       200 when every scheduler thread is alive
    GET  /metrics                      Prometheus text (metrics.py lists the names)
    POST /glassmind/autopsy            glassmind.autopsy.autopsy_json of one position of a token sequence
    POST /glassmind/rank/sample        K distinct sampled replies to a prompt, for a person to rank
    POST /glassmind/rank               append {"prompt", "responses", "ranking"} to the preference file
    GET  /glassmind/scheduler          the live view: batch slots, queue, tokens/s
    GET  /  and /static/<name>         the web page, from files read once at start (no request touches disk)

Requests are checked (protocol.py) before anything reaches the scheduler: a bad one costs the running batch
nothing. The model runs only in the scheduler thread (scheduler.py) or, for beam search, in a worker thread
with an Engine of its own (the model's weights are only read); the autopsy, which may hook the model's
modules, runs in the scheduler thread between two decode steps, so no served token sees its hooks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glassmind.infer.sampling import SamplingParams
from glassmind.serve.metrics import Metrics
from glassmind.serve.protocol import MAX_BODY, ApiError, Parsed, bad, parse
from glassmind.serve.scheduler import QueueFull, Request as SchedRequest, RowSpec, Scheduler

WEB = Path(__file__).parent / "web"
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
# the page runs only its own script and style, so even a bug in escaping could not run injected code
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
STOP_TOKENS = ("<|endoftext|>", "<|end|>")
TRANSCRIPT_STOP = "\nUser:"   # a base model's reply ends where it starts the next user line


@dataclass
class Served:
    """One run being served."""

    name: str
    model: Any
    tok: Any
    scheduler: Scheduler
    fmt: Any          # ChatFormat, or None for a base model (plain transcript)
    created: int

    @property
    def context(self) -> int:
        return self.model.config.context_length


def make_served(name: str, model, tok, *, max_batch: int = 16, max_queue: int = 64, metrics: Metrics | None = None,
                compile: bool = False) -> Served:
    """One served model. compile: its decode steps run a torch.compile'd step (compiled.CompiledStep),
    compiled here, before the server answers, for a batch of 1 and for batches of 2 or more (the first
    request must not wait for a compilation)."""
    from glassmind.tokenizer.chat import ChatFormat, has_chat_tokens

    specials = getattr(tok, "special_tokens", {}) or {}
    eos = tuple(specials[s] for s in STOP_TOKENS if s in specials)
    compiled = None
    if compile:
        from glassmind.infer.compiled import CompiledStep

        compiled = CompiledStep(model)
        compiled.refresh()     # the weights do not change while serving: one snapshot, one generation
        warm_up(model, compiled, min(2, max_batch))
    sched = Scheduler(name, model, tok, max_batch=max_batch, max_queue=max_queue, eos_ids=eos, metrics=metrics,
                      compiled=compiled)
    if metrics is not None:
        metrics.ensure(name)
    fmt = ChatFormat(tok) if has_chat_tokens(tok) else None
    return Served(name, model, tok, sched, fmt, int(time.time()))


def warm_up(model, compiled, rows: int) -> None:
    """Compile the decode step for batches of 1 and (rows >= 2) of 2 or more, by two steps of each."""
    import torch

    from glassmind.infer.continuous import RunningBatch

    for n in sorted({1, rows}):
        batch = RunningBatch(model, compiled=compiled)
        batch.admit([[0]] * n)
        for _ in range(2):
            batch.step(torch.zeros(n, dtype=torch.long))


def _json(text: bytes) -> Any:
    def no_constant(c):
        raise ValueError(c)

    try:
        return json.loads(text.decode("utf-8"), parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON (UTF-8, no NaN/Infinity)", code="invalid_json") \
            from None


async def read_body(request: Request) -> Any:
    cl = request.headers.get("content-length")
    if cl is not None and (not cl.isdigit() or int(cl) > MAX_BODY):
        raise ApiError(413, f"the request body exceeds {MAX_BODY // (1024 * 1024)} MB", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body exceeds {MAX_BODY // (1024 * 1024)} MB", code="body_too_large")
        chunks.append(chunk)
    return _json(b"".join(chunks))


def create_app(served: list[Served], *, api_key: str | None = None, preferences: str | Path = "preferences.jsonl",
               metrics: Metrics | None = None) -> FastAPI:
    models = {s.name: s for s in served}
    metrics = metrics or Metrics()
    static = {name: (WEB / name).read_bytes() for name in STATIC}   # read once: requests never touch disk
    pref_path = Path(preferences)
    pref_lock = threading.Lock()

    async def lifespan(app):
        for s in served:
            if not s.scheduler.thread.is_alive() and not s.scheduler.closed:
                s.scheduler.start()
        yield
        for s in served:
            s.scheduler.close()

    app = FastAPI(title="glassmind", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.served = models
    app.state.metrics = metrics

    # -- errors: always the OpenAI envelope ----------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kinds = {404: ("not_found_error", "no such route"), 405: ("invalid_request_error", "method not allowed")}
        kind, msg = kinds.get(e.status_code, ("invalid_request_error", "bad request"))
        return JSONResponse(ApiError(e.status_code, msg, type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):  # a bug: say so without details
        return JSONResponse(ApiError(500, "internal server error", type="server_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    def find(name: str) -> Served:
        s = models.get(name)
        if s is None:
            raise ApiError(404, "the model does not exist: GET /v1/models lists the served ones", param="model",
                           code="model_not_found", type="not_found_error")
        return s

    # -- page, health, metrics --------------------------------------------------------------------------------------
    @app.get("/")
    async def index():
        return Response(static["index.html"], media_type=STATIC["index.html"], headers=PAGE_HEADERS)

    @app.get("/static/{name}")
    async def asset(name: str):
        if name not in static:
            raise ApiError(404, "no such file", type="not_found_error")
        return Response(static[name], media_type=STATIC[name], headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        dead = [s.name for s in served if not s.scheduler.thread.is_alive()]
        if dead:
            return JSONResponse({"status": "error", "dead": dead}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": s.created,
                                            "owned_by": "glassmind", "max_model_len": s.context,
                                            "chat_format": s.fmt is not None} for s in served]}

    # -- generation ---------------------------------------------------------------------------------------------------
    def encode_prompts(s: Served, p: Parsed) -> tuple[list[list[int]], tuple[str, ...]]:
        from glassmind.infer.generate import encode_prompt

        stops = p.stops
        V = s.model.config.vocab_size
        if p.kind == "chat":
            if s.fmt is not None:
                ids = s.fmt.render_prompt(p.messages)
            else:
                text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in p.messages) + "Assistant:"
                ids = s.tok.encode(text)
                stops = stops + (TRANSCRIPT_STOP,)
            return [ids], stops
        prompt = p.prompt
        if isinstance(prompt, str):
            prompts = [encode_prompt(s.tok, prompt)]
        elif isinstance(prompt[0], str):
            prompts = [encode_prompt(s.tok, x) for x in prompt]
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]
        else:
            prompts = [list(x) for x in prompt]
        for x in prompts:
            if any(not 0 <= t < V for t in x):
                raise bad("prompt", f"token ids must be in [0, {V}) (this model's vocabulary)")
        return prompts, stops

    def budget(s: Served, p: Parsed, prompts: list[list[int]]) -> list[int]:
        C, out = s.context, []
        for x in prompts:
            P = len(x)
            if P >= C:
                raise ApiError(400, f"the prompt has {P} tokens but this model's context is {C} tokens, with "
                                    "room needed for at least one new token: shorten the prompt",
                               param="messages" if p.kind == "chat" else "prompt", code="context_length_exceeded")
            if p.max_tokens is None:
                out.append(min(16, C - P) if p.kind == "completions" else C - P)
            elif P + p.max_tokens > C:
                raise ApiError(400, f"this model's maximum context length is {C} tokens, but the request needs "
                                    f"{P + p.max_tokens} ({P} in the prompt + {p.max_tokens} max_tokens): shorten "
                                    "the prompt or lower max_tokens", param="max_tokens",
                               code="context_length_exceeded")
            else:
                out.append(p.max_tokens)
        return out

    def sampling(p: Parsed, logprobs: int) -> SamplingParams:
        return SamplingParams(strategy="sample" if p.temperature > 0 else "greedy", max_new_tokens=1,
                              temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                              repetition_penalty=p.repetition_penalty, seed=p.seed, top_logprobs=logprobs)

    def piece(s: Served, t: int) -> str:
        return s.tok.decode([t])

    def token_bytes(s: Served, t: int) -> list[int]:
        f = getattr(s.tok, "decode_bytes", None)
        return list(f([t])) if callable(f) else list(s.tok.decode([t]).encode())

    def chat_lp(s: Served, t: int, lp: float, tops) -> dict:
        return {"token": piece(s, t), "logprob": lp, "bytes": token_bytes(s, t),
                "top_logprobs": [{"token": piece(s, a), "logprob": b, "bytes": token_bytes(s, a)} for a, b in tops]}

    async def generate(request: Request, kind: str):
        authorize(request)
        body = await read_body(request)
        p = parse(body, kind)
        s = find(p.model)
        prompts, stops = encode_prompts(s, p)
        max_new = budget(s, p, prompts)
        rows = [RowSpec(x, i * p.n + j, j) for i, x in enumerate(prompts) for j in range(p.n)]
        if len(rows) > s.scheduler.max_batch:
            raise bad("n", f"n x prompts ({len(rows)}) exceeds this server's batch ({s.scheduler.max_batch} rows)")
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if p.beam:
            return await beam(request, s, p, prompts, stops, max_new, rid)
        params = sampling(p, p.logprobs or 0)
        req = SchedRequest(rows, params, [max_new[i // p.n] for i in range(len(rows))], stops=stops,
                           ignore_eos=p.ignore_eos, kind=kind, loop=asyncio.get_running_loop())
        try:
            s.scheduler.submit(req)
        except QueueFull:
            metrics.finished(s.name, "rejected")
            raise ApiError(429, "the server's queue is full: retry after the delay in Retry-After",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        prompt_tokens = sum(len(x) for x in prompts)
        if p.stream:
            return StreamingResponse(stream(request, s, p, req, rid, prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, s, p, req, rid, prompt_tokens, prompts)

    async def batches(request: Request, s: Served, req: SchedRequest) -> AsyncIterator[list]:
        """The request's events, in the lists the scheduler hands over (one per decode step), until its end;
        a client gone away cancels it (its rows leave the batch before the next step)."""
        gone = object()

        async def watch():   # one sleeping task per request, not a timeout per step
            while True:
                await asyncio.sleep(0.25)
                if await request.is_disconnected():
                    s.scheduler.cancel(req)
                    req.events.put_nowait(gone)
                    return

        watcher = asyncio.create_task(watch())
        try:
            while True:
                items = await req.events.get()
                if items is gone:
                    return
                batch = []
                for ev in items:
                    if ev is None:
                        if batch:
                            yield batch
                        if req.error:
                            raise ApiError(500, req.error, type="server_error")
                        return
                    batch.append(ev)
                yield batch
        finally:
            watcher.cancel()

    async def events(request: Request, s: Served, req: SchedRequest) -> AsyncIterator:
        async for batch in batches(request, s, req):
            for ev in batch:
                yield ev

    async def complete(request, s: Served, p: Parsed, req, rid, prompt_tokens, prompts):
        n_choices = len(req.rows)
        text = [""] * n_choices
        toks: list[list] = [[] for _ in range(n_choices)]
        finish: list[str | None] = [None] * n_choices
        try:
            async for ev in events(request, s, req):
                text[ev.index] += ev.text
                toks[ev.index].append(ev)
                if ev.finish_reason:
                    finish[ev.index] = ev.finish_reason
        finally:
            if not all(finish):
                s.scheduler.cancel(req)
        if not all(finish):  # the client left; nobody reads this
            return Response(status_code=499)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(len(t) for t in toks),
                 "total_tokens": prompt_tokens + sum(len(t) for t in toks)}
        choices = []
        for i in range(n_choices):
            c: dict[str, Any] = {"index": i, "finish_reason": finish[i]}
            if p.kind == "chat":
                c["message"] = {"role": "assistant", "content": text[i]}
                c["logprobs"] = None if p.logprobs is None else {
                    "content": [chat_lp(s, e.token, e.logprob, e.top_logprobs) for e in toks[i]]}
            else:
                c["text"] = text[i]
                c["logprobs"] = None if p.logprobs is None else legacy_lp(s, toks[i], 0)
            if p.return_token_ids:
                c["token_ids"] = [e.token for e in toks[i]]
                c["prompt_token_ids"] = prompts[i // p.n]
            choices.append(c)
        obj = "chat.completion" if p.kind == "chat" else "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": s.name, "choices": choices,
                "usage": usage, "system_fingerprint": None}

    def legacy_lp(s: Served, evs, offset: int) -> dict:
        tokens, lps, tops, offs = [], [], [], []
        for e in evs:
            tokens.append(piece(s, e.token))
            lps.append(e.logprob)
            tops.append({piece(s, a): b for a, b in e.top_logprobs})
            offs.append(offset)
            offset += len(e.text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    async def stream(request, s: Served, p: Parsed, req, rid, prompt_tokens) -> AsyncIterator[bytes]:
        created = int(time.time())
        obj = "chat.completion.chunk" if p.kind == "chat" else "text_completion"
        generated = 0
        offsets = [0] * len(req.rows)
        finished = 0

        def sse(payload: dict) -> bytes:
            if p.include_usage:
                payload.setdefault("usage", None)
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

        def chunk(choice: dict) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": s.name, "system_fingerprint": None,
                    "choices": [choice]}

        try:
            if p.kind == "chat":
                for i in range(len(req.rows)):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}
                    if p.return_token_ids:
                        first["prompt_token_ids"] = req.rows[i].prompt
                    yield sse(chunk(first))
            async for batch in batches(request, s, req):
                out = []
                for ev in batch:
                    generated += 1
                    if p.kind == "chat":
                        c: dict[str, Any] = {"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                                             "logprobs": None, "finish_reason": ev.finish_reason}
                        if p.logprobs is not None:
                            c["logprobs"] = {"content": [chat_lp(s, ev.token, ev.logprob, ev.top_logprobs)]}
                    else:
                        c = {"index": ev.index, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
                        if p.logprobs is not None:
                            c["logprobs"] = legacy_lp(s, [ev], offsets[ev.index])
                        offsets[ev.index] += len(ev.text)
                    if p.return_token_ids:
                        c["token_ids"] = [ev.token]
                    out.append(sse(chunk(c)))
                    if ev.finish_reason:
                        finished += 1
                yield b"".join(out)   # one write per decode step
            if finished < len(req.rows):
                return  # cancelled: the client is gone
            if p.include_usage:
                yield sse({"id": rid, "object": obj, "created": created, "model": s.name, "system_fingerprint": None,
                           "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                                    "total_tokens": prompt_tokens + generated}})
            yield b"data: [DONE]\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n".encode()
        finally:
            if finished < len(req.rows):
                s.scheduler.cancel(req)

    async def beam(request, s: Served, p: Parsed, prompts, stops, max_new, rid):
        from glassmind.infer.detok import Detokenizer
        from glassmind.infer.engine import Engine
        from glassmind.serve.scheduler import StopMatcher

        eos = () if p.ignore_eos else tuple(s.scheduler.eos)
        params = SamplingParams(strategy="beam", num_beams=p.num_beams, num_return_sequences=p.n,
                                length_penalty=p.length_penalty, repetition_penalty=p.repetition_penalty,
                                max_new_tokens=min(max_new), eos_token_ids=eos, top_logprobs=p.logprobs or 0)
        results = await asyncio.to_thread(Engine(s.model, packed=False).generate, prompts, params)
        choices, completion = [], 0
        for i, r in enumerate(results):
            for j, h in enumerate(r.beams):
                ids = h.ids[: len(h.ids) - h.stop_len]
                m = StopMatcher(stops)
                text, stopped = m.push(Detokenizer(s.tok).push_many(ids))
                text = text if stopped else text + m.flush()
                completion += len(h.ids)
                reason = "stop" if (h.finish_reason == "stop" or stopped) else "length"
                c: dict[str, Any] = {"index": i * p.n + j, "finish_reason": reason}
                if p.kind == "chat":
                    c["message"] = {"role": "assistant", "content": text}
                    c["logprobs"] = None if p.logprobs is None else {"content": [
                        chat_lp(s, t, lp, tp) for t, lp, tp in zip(h.ids, h.logprobs, h.top_logprobs or [[]] * len(h.ids))]}
                else:
                    c["text"], c["logprobs"] = text, None
                c["beam_score"] = h.score
                choices.append(c)
        pt = sum(len(x) for x in prompts)
        return {"id": rid, "object": "chat.completion" if p.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": s.name, "choices": choices,
                "usage": {"prompt_tokens": pt, "completion_tokens": completion, "total_tokens": pt + completion}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    # -- glassmind's routes ---------------------------------------------------------------------------------------------
    def _obj(body: Any, allowed: set[str]) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_body")
        if set(body) - allowed:
            raise ApiError(400, "unrecognized request argument(s)", code="unknown_field")
        return body

    @app.post("/glassmind/autopsy")
    async def autopsy(request: Request):
        authorize(request)
        body = _obj(await read_body(request), {"model", "ids", "position", "target", "top_k", "ablate"})
        s = find(body.get("model") if isinstance(body.get("model"), str) else "")
        ids = body.get("ids")
        V = s.model.config.vocab_size
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids)):
            raise bad("ids", f"`ids` must be a non-empty array of token ids in [0, {V})")
        if len(ids) > s.context:
            raise bad("ids", f"`ids` holds {len(ids)} tokens; this model's context is {s.context}")
        from glassmind.serve.protocol import _bool, _int

        position = _int(body, "position", -len(ids), len(ids) - 1, -1)
        target = _int(body, "target", 0, V - 1, None)
        top_k = _int(body, "top_k", 1, 20, 5)
        ablate = _bool(body, "ablate", True)
        try:
            from glassmind.autopsy import autopsy_json
        except ImportError:
            raise ApiError(501, "this glassmind has no autopsy (glassmind.autopsy is missing)", type="server_error",
                           code="not_installed") from None
        fut = s.scheduler.call(lambda: autopsy_json(s.model, s.tok, ids, position=position, target=target,
                                                    top_k=top_k, ablate=ablate))
        return await asyncio.wrap_future(fut)

    @app.post("/glassmind/rank/sample")
    async def rank_sample(request: Request):
        authorize(request)
        body = _obj(await read_body(request), {"model", "prompt", "k", "temperature", "max_tokens", "seed"})
        s = find(body.get("model") if isinstance(body.get("model"), str) else "")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 4000:
            raise bad("prompt", "`prompt` must be a non-empty string of at most 4000 characters")
        from glassmind.serve.protocol import _int, _num

        k = _int(body, "k", 2, 8, 4)
        samples = min(3 * k, s.scheduler.max_batch)
        chat = {"model": s.name, "messages": [{"role": "user", "content": prompt}], "n": samples,
                "temperature": _num(body, "temperature", 0.0, 2.0, 1.0),
                "max_tokens": _int(body, "max_tokens", 1, 256, 48), "seed": _int(body, "seed", 0, 2**62, None)}
        p = parse(chat, "chat")
        prompts, stops = encode_prompts(s, p)
        max_new = budget(s, p, prompts)
        req = SchedRequest([RowSpec(prompts[0], j, j) for j in range(samples)], sampling(p, 0),
                           max_new * samples, stops=stops, kind="rank", loop=asyncio.get_running_loop())
        try:
            s.scheduler.submit(req)
        except QueueFull:
            raise ApiError(429, "the server's queue is full", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        texts = [""] * samples
        async for ev in events(request, s, req):
            texts[ev.index] += ev.text
        out: list[str] = []
        for t in texts:  # distinct non-empty replies, as `glassmind rank` shows them
            t = t.strip()
            if t and t not in out:
                out.append(t)
        return {"prompt": prompt, "responses": out[:k]}

    @app.post("/glassmind/rank")
    async def rank_submit(request: Request):
        authorize(request)
        body = _obj(await read_body(request), {"prompt", "responses", "ranking"})
        prompt, responses, ranking = body.get("prompt"), body.get("responses"), body.get("ranking")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad("prompt", "`prompt` must be a non-empty string")
        if (not isinstance(responses, list) or not 2 <= len(responses) <= 16
                or not all(isinstance(r, str) and r for r in responses)):
            raise bad("responses", "`responses` must be 2 to 16 non-empty strings")
        if (not isinstance(ranking, list) or len(ranking) != len(responses)
                or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= len(responses)
                           for x in ranking)):
            raise bad("ranking", "`ranking` must hold one rank per response, integers 1 (best) to K; equal "
                                 "ranks are ties")
        if len(set(ranking)) == 1:
            raise bad("ranking", "every response has the same rank: a ranking must prefer at least one")
        from glassmind.recipes.rank import append_record

        record = {"prompt": [{"role": "user", "content": prompt}], "responses": responses, "ranking": ranking}
        with pref_lock:
            pref_path.parent.mkdir(parents=True, exist_ok=True)
            append_record(pref_path, record)
            count = sum(1 for line in pref_path.open(encoding="utf-8") if line.strip())
        return {"saved": True, "rankings": count}

    @app.get("/glassmind/scheduler")
    async def scheduler_view(request: Request):
        authorize(request)
        return {"models": [s.scheduler.snapshot() for s in served]}

    return app
