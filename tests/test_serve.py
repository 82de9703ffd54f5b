"""`glassmind serve`: the official openai SDK against a live server, llama.cpp-style conformance (stream ==
non-stream, seeded determinism across batch company, logprob shapes), the bad-request matrix, 429, client
disconnects, metrics, the ranking loop into reward's loader, the autopsy route, and a bounded load test.

Everything runs against a real uvicorn on 127.0.0.1 (a thread of this process) serving a random tiny decoder
with a small BPE that has the chat tokens (tests/serve_fixture.py)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixture import LiveServer, make_app, tiny_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("serve")
    models = {"tiny": tiny_run(), "long": tiny_run(context=1024, seed=1)}
    app, served = make_app(tmp, api_key=KEY, models=models)
    with LiveServer(app) as srv:
        srv.app, srv.served, srv.tmp = app, {s.name: s for s in served}, tmp
        srv.http = httpx.Client(base_url=srv.url, headers=AUTH, timeout=60)
        yield srv


def sdk(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def sse(text: str) -> list:
    """The data payloads of an SSE body, checked for framing: every event one `data: ` line, then a blank."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


CHAT = [{"role": "user", "content": "Hello world! How are you?"}]


# ----------------------------------------------------------------------------------------------- the SDK


def test_the_openai_sdk_chats_completes_streams_and_gets_logprobs(live):
    client = sdk(live)
    assert [m.id for m in client.models.list().data] == ["tiny", "long"]
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(choice.logprobs.content) <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)

    c = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=6, temperature=0, logprobs=3)
    assert isinstance(c.choices[0].text, str) and len(c.choices[0].logprobs.token_logprobs) == c.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and chunks[-1].choices == []


def test_the_sdk_raises_its_typed_exceptions(live):
    openai = pytest.importorskip("openai")
    client = sdk(live)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()


# ----------------------------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_streamed_text_concatenates_to_the_non_streamed_text_at_temperature_0(live, kind):
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = {"model": "tiny", "max_tokens": 30, "temperature": 0, "stop": ["lazy"]}
    body.update({"messages": CHAT} if kind == "chat" else {"prompt": "The quick brown"})
    whole = live.http.post(path, json=body).json()["choices"][0]
    events = sse(live.http.post(path, json={**body, "stream": True}).text)
    assert events[-1] == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content", "") if kind == "chat" else e["choices"][0]["text"]
              for e in events[:-1]]
    text = whole["message"]["content"] if kind == "chat" else whole["text"]
    assert "".join(pieces) == text and len(pieces) > 3
    assert events[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]


def _chat(live, seed, max_tokens=24, **kw):
    r = live.http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "seed": seed,
                                                     "temperature": 1.0, "max_tokens": max_tokens,
                                                     "return_token_ids": True, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_the_same_seed_gives_the_same_text_alone_and_beside_7_others_and_other_seeds_differ(live):
    from glassmind.infer import Engine, SamplingParams

    alone = _chat(live, 1234)
    s = live.served["tiny"]
    [ref] = Engine(s.model).generate([s.fmt.render_prompt(CHAT)], SamplingParams(
        strategy="sample", seed=1234, temperature=1.0, max_new_tokens=24, eos_token_ids=tuple(s.scheduler.eos)))
    assert alone == ref.ids          # the engine's own seeded generation of that prompt, to the logprob
    lps = [t["logprob"] for t in live.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": CHAT, "seed": 1234, "temperature": 1.0, "max_tokens": 24,
        "logprobs": True}).json()["choices"][0]["logprobs"]["content"]]
    assert lps == pytest.approx(ref.logprobs, abs=1e-5)
    results: dict[int, list[int]] = {}

    def client(i):   # 7 others with other seeds and lengths, then the seeded request joins their batch
        results[i] = _chat(live, 1234 if i == 0 else 99 + i, max_tokens=24 if i == 0 else 60, ignore_eos=i > 0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(1, 8)]
    for t in threads:
        t.start()
    t0 = time.time()
    while len(s.scheduler.rows) < 3 and time.time() - t0 < 10:
        time.sleep(0.001)
    seeded = threading.Thread(target=client, args=(0,))
    seeded.start()
    for t in [seeded, *threads]:
        t.join()
    occ = live.app.state.metrics.hists[("glassmind_batch_occupancy", (("model", "tiny"),))]
    assert sum(occ.counts[2:]) > 0, "the requests never shared a decode step"
    assert results[0] == alone
    assert len({tuple(v[:24]) for v in results.values()}) == 8, "different seeds gave the same text"


def test_logprobs_are_the_models_own_and_shaped_as_the_openai_api_says(live):
    r = live.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": CHAT, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3,
        "return_token_ids": True}).json()["choices"][0]
    content = r["logprobs"]["content"]
    assert len(content) == len(r["token_ids"])
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["logprob"] <= 0 and isinstance(item["bytes"], list)
        lps = [t["logprob"] for t in item["top_logprobs"]]
        assert len(lps) == 3 and lps == sorted(lps, reverse=True)
        assert item["logprob"] == pytest.approx(lps[0], abs=1e-5)   # greedy picks the most likely
    # the reference: the model's own forward pass over prompt + reply, log-softmaxed
    s = live.served["tiny"]
    prompt = s.fmt.render_prompt(CHAT)
    ids = torch.tensor([prompt + r["token_ids"]])
    with torch.no_grad():
        ref = s.model(ids).log_softmax(-1)[0, len(prompt) - 1: -1]
    for j, item in enumerate(content):
        assert item["logprob"] == pytest.approx(float(ref[j, r["token_ids"][j]]), abs=1e-4)
        assert [t["token"] for t in item["top_logprobs"]] == [s.tok.decode([int(i)]) for i in ref[j].topk(3).indices]
    # completions: the legacy shape
    c = live.http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4, "logprobs": 2,
                                                "temperature": 0}).json()["choices"][0]["logprobs"]
    assert set(c) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(c["tokens"]) == len(c["token_logprobs"]) == len(c["top_logprobs"]) == len(c["text_offset"]) == 4
    assert all(len(d) <= 2 for d in c["top_logprobs"]) and c["text_offset"] == sorted(c["text_offset"])


def test_n_choices_stop_strings_and_beam_search_extras(live):
    r = live.http.post("/v1/completions", json={"model": "tiny", "prompt": "The", "n": 3, "seed": 5,
                                                "max_tokens": 12}).json()
    assert sorted(c["index"] for c in r["choices"]) == [0, 1, 2]
    from glassmind.infer import Engine, SamplingParams

    s = live.served["tiny"]
    prompt = s.tok.encode("The quick")
    [ref] = Engine(s.model).generate([prompt], SamplingParams(strategy="beam", num_beams=3, num_return_sequences=2,
                                                             max_new_tokens=6, eos_token_ids=tuple(s.scheduler.eos)))
    b = live.http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "n": 2, "max_tokens": 6,
                                                "use_beam_search": True, "num_beams": 3}).json()
    assert [c["beam_score"] for c in b["choices"]] == pytest.approx([h.score for h in ref.beams])
    # a stop string ends the text before it; the same request without it runs on past it
    free = live.http.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 20,
                                                   "temperature": 0}).json()["choices"][0]["text"]
    cut = free[3:6]
    assert cut
    stopped = live.http.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 20,
                                                      "temperature": 0, "stop": [cut]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == free[: free.index(cut)]


# ----------------------------------------------------------------------------------------------- bad requests

ECHO = "<script>ECHO_ME</script>"
GOOD = {"model": "tiny", "messages": CHAT, "max_tokens": 4}
MATRIX = [
    # (name, path, body (bytes = raw), headers, status, param, code)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", ', {}, 400, None, "invalid_json"),
    ("NaN", "/v1/chat/completions", b'{"model": "tiny", "temperature": NaN}', {}, 400, None, "invalid_json"),
    ("not UTF-8", "/v1/chat/completions", b'{"model": "\xff"}', {}, 400, None, "invalid_json"),
    ("an array body", "/v1/chat/completions", [GOOD], {}, 400, None, "invalid_body"),
    ("a string body", "/v1/completions", ECHO, {}, 400, None, "invalid_body"),
    ("unknown field", "/v1/chat/completions", {**GOOD, "max_token": 3}, {}, 400, None, "unknown_field"),
    ("unknown field, odd name", "/v1/chat/completions", {**GOOD, ECHO: 1}, {}, 400, None, "unknown_field"),
    ("no model", "/v1/chat/completions", {"messages": CHAT}, {}, 400, "model", "missing_model"),
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": ECHO}, {}, 404, "model", "model_not_found"),
    ("temperature a string", "/v1/chat/completions", {**GOOD, "temperature": ECHO}, {}, 400, "temperature",
     "invalid_type"),
    ("temperature out of range", "/v1/chat/completions", {**GOOD, "temperature": 2.5}, {}, 400, "temperature",
     "invalid_value"),
    ("top_p 0", "/v1/chat/completions", {**GOOD, "top_p": 0}, {}, 400, "top_p", "invalid_value"),
    ("max_tokens 0", "/v1/chat/completions", {**GOOD, "max_tokens": 0}, {}, 400, "max_tokens", "invalid_value"),
    ("max_tokens a float", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2.5}, {}, 400,
     "max_tokens", "invalid_type"),
    ("n a bool", "/v1/chat/completions", {**GOOD, "n": True}, {}, 400, "n", "invalid_type"),
    ("n too large", "/v1/chat/completions", {**GOOD, "n": 99}, {}, 400, "n", "invalid_value"),
    ("top_logprobs 21", "/v1/chat/completions", {**GOOD, "logprobs": True, "top_logprobs": 21}, {}, 400,
     "top_logprobs", "invalid_value"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**GOOD, "top_logprobs": 2}, {}, 400,
     "top_logprobs", "invalid_value"),
    ("stop a number", "/v1/chat/completions", {**GOOD, "stop": 5}, {}, 400, "stop", "invalid_type"),
    ("stop_options without stream", "/v1/chat/completions", {**GOOD, "stream_options": {"include_usage": True}},
     {}, 400, "stream_options", "invalid_value"),
    ("beam search streamed", "/v1/completions", {"model": "tiny", "prompt": "a", "use_beam_search": True,
                                                 "stream": True}, {}, 400, "stream", "invalid_value"),
    ("seed negative", "/v1/chat/completions", {**GOOD, "seed": -1}, {}, 400, "seed", "invalid_value"),
    ("empty messages", "/v1/chat/completions", {**GOOD, "messages": []}, {}, 400, "messages", "invalid_value"),
    ("messages an object", "/v1/chat/completions", {**GOOD, "messages": {"role": "user"}}, {}, 400, "messages",
     "invalid_type"),
    ("a bad role", "/v1/chat/completions", {**GOOD, "messages": [{"role": ECHO, "content": "hi"}]}, {}, 400,
     "messages[0].role", "invalid_value"),
    ("content a number", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": 3}]}, {}, 400,
     "messages[0].content", "invalid_type"),
    ("content an image part", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": ECHO}}]}]}, {}, 400, "messages[0].content", "invalid_type"),
    ("prompt a number", "/v1/completions", {"model": "tiny", "prompt": 5}, {}, 400, "prompt", "invalid_type"),
    ("token ids outside the vocabulary", "/v1/completions", {"model": "tiny", "prompt": [1, 10**6]}, {}, 400,
     "prompt", "invalid_value"),
    ("prompt + max_tokens over the context", "/v1/completions", {"model": "tiny", "prompt": [5] * 90,
                                                                 "max_tokens": 10}, {}, 400, "max_tokens",
     "context_length_exceeded"),
    ("prompt alone over the context", "/v1/completions", {"model": "tiny", "prompt": [5] * 200}, {}, 400, "prompt",
     "context_length_exceeded"),
    ("body over 2 MB", "/v1/completions", {"model": "tiny", "prompt": "a" * (2 * 1024 * 1024 + 10)}, {}, 413, None,
     "body_too_large"),
    ("no key", "/v1/chat/completions", GOOD, {"Authorization": ""}, 401, None, "invalid_api_key"),
    ("wrong key", "/v1/chat/completions", GOOD, {"Authorization": "Bearer " + ECHO}, 401, None, "invalid_api_key"),
    ("unknown route", "/v1/nothing", GOOD, {}, 404, None, None),
    ("static path escape", "/static/..%2F..%2Fapp.py", None, {}, 404, None, None),
]


def _send(live, path, body, headers):
    if body is None:
        return live.http.get(path, headers=headers)
    if isinstance(body, bytes):
        return live.http.post(path, content=body, headers={"content-type": "application/json", **headers})
    return live.http.post(path, json=body, headers=headers)


@pytest.mark.parametrize("name,path,body,headers,status,param,code", MATRIX, ids=[m[0] for m in MATRIX])
def test_a_bad_request_gets_its_status_in_the_openai_envelope_without_the_request_echoed(live, name, path, body,
                                                                                         headers, status, param, code):
    r = _send(live, path, body, headers)
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert err["param"] == param and (code is None or err["code"] == code)
    assert "ECHO_ME" not in r.text


def test_bad_requests_cost_the_running_batch_nothing(live):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 40, "temperature": 0.8, "seed": 7}
    reference = live.http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as other:
        with other.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            lines = s.iter_lines()
            first = next(lines)
            for name, path, bad, headers, status, *_ in MATRIX[:-4]:   # while it streams
                if status != 413:
                    assert _send(live, path, bad, headers).status_code == status
            rest = [first, *lines]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in sse("\n\n".join(x for x in rest if x))[:-1])
    assert text == reference


# ----------------------------------------------------------------------------------------------- queue and cancellation


def test_a_full_queue_answers_429_at_once_with_retry_after(tmp_path):
    app, served = make_app(tmp_path, max_batch=1, max_queue=1, models={"long": tiny_run(context=1024)})
    sched = served[0].scheduler
    body = {"model": "long", "prompt": "a", "max_tokens": 400, "ignore_eos": True}
    with LiveServer(app) as srv:
        statuses = []
        def post():
            statuses.append(httpx.post(srv.url + "/v1/completions", json=body, timeout=60).status_code)
        first = threading.Thread(target=post)
        first.start()
        t0 = time.time()
        while not sched.rows and time.time() - t0 < 10:      # admitted: it holds the only slot
            time.sleep(0.002)
        second = threading.Thread(target=post)
        second.start()
        while not sched.waiting and time.time() - t0 < 10:   # queued behind it: the queue is full
            time.sleep(0.002)
        assert len(sched.rows) == 1 and len(sched.waiting) == 1
        t = time.perf_counter()
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        took = time.perf_counter() - t
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full" and took < 1.0
        assert len(sched.rows) == 1 and len(sched.waiting) == 1   # it was refused while the queue was full
        first.join()
        second.join()
        assert statuses == [200, 200]


def test_a_client_that_disconnects_frees_its_slot_within_a_second(live):
    sched = live.served["long"].scheduler
    body = {"model": "long", "prompt": "a", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    for stream in (True, False):
        c = httpx.Client(base_url=live.url, headers=AUTH, timeout=60)
        if stream:
            with c.stream("POST", "/v1/completions", json=body) as s:
                it = s.iter_lines()
                for _ in range(3):
                    next(it)
                assert len(sched.rows) == 1
        else:   # a non-streaming client that gives up
            th = threading.Thread(target=lambda: pytest.raises(httpx.HTTPError, c.post, "/v1/completions",
                                                              json={**body, "stream": False}, timeout=0.5))
            th.start()
            t0 = time.time()
            while not sched.rows and time.time() - t0 < 5:
                time.sleep(0.005)
            assert len(sched.rows) == 1
            th.join()
        c.close()
        t0 = time.perf_counter()
        while sched.rows and time.perf_counter() - t0 < 3:
            time.sleep(0.01)
        freed = time.perf_counter() - t0
        assert not sched.rows and freed < 1.0, f"stream={stream}: slot still held after {freed:.2f} s"
        assert sched.batch.size == 0


# ----------------------------------------------------------------------------------------------- metrics, health


def test_metrics_count_what_was_served_under_the_documented_names(live):
    def scrape():
        text = live.http.get("/metrics").text
        vals = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                vals[k] = float(v)
        return text, vals

    _, before = scrape()
    r = live.http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 7, "n": 2,
                                                "ignore_eos": True}).json()
    text, after = scrape()
    from glassmind.serve.metrics import HELP

    for name, (kind, _) in HELP.items():
        assert f"# TYPE {name} {kind}" in text
    m = '{model="tiny"}'
    assert after[f"glassmind_generation_tokens_total{m}"] - before[f"glassmind_generation_tokens_total{m}"] == 14
    assert after[f"glassmind_prompt_tokens_total{m}"] - before[f"glassmind_prompt_tokens_total{m}"] == \
        2 * r["usage"]["prompt_tokens"]
    assert after[f"glassmind_time_to_first_token_seconds_count{m}"] - \
        before[f"glassmind_time_to_first_token_seconds_count{m}"] == 1
    assert after[f"glassmind_inter_token_latency_seconds_count{m}"] - \
        before[f"glassmind_inter_token_latency_seconds_count{m}"] == 6   # 7 steps of 2 rows: 6 gaps
    assert after['glassmind_requests_total{model="tiny",status="ok"}'] - \
        before['glassmind_requests_total{model="tiny",status="ok"}'] == 1
    assert live.http.get("/health").json() == {"status": "ok"}


def test_the_page_is_served_from_memory_with_a_content_security_policy(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and "<title>glassmind</title>" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text   # nothing fetched from outside
    js = httpx.get(live.url + "/static/app.js").text
    assert "https://" not in js and ".innerHTML" not in js          # text goes in as text, never as markup


# ----------------------------------------------------------------------------------------------- the ranking loop


def test_a_ranking_from_the_page_is_read_by_rewards_loader(live):
    from glassmind.data.tasks import read_preferences_jsonl
    from glassmind.recipes.reward import RewardConfig, preferences

    r = live.http.post("/glassmind/rank/sample", json={"model": "tiny", "prompt": "Say hi", "k": 3, "seed": 1})
    assert r.status_code == 200
    responses = r.json()["responses"]
    assert 2 <= len(responses) <= 3 and len(set(responses)) == len(responses)
    ranking = [2, 1, 2][: len(responses)]
    assert live.http.post("/glassmind/rank", json={"prompt": "Say hi", "responses": responses,
                                                   "ranking": ranking}).json()["saved"]
    for bad in ([1] * len(responses), [0, 1, 2][: len(responses)], "1 2"):
        assert live.http.post("/glassmind/rank", json={"prompt": "Say hi", "responses": responses,
                                                       "ranking": bad}).status_code == 400
    path = live.tmp / "prefs.jsonl"
    [p] = [p for p in read_preferences_jsonl(path) if p.responses == responses]
    assert p.prompt == [{"role": "user", "content": "Say hi"}] and p.ranks == ranking
    train, val = preferences(RewardConfig(data=str(path), val_fraction=0.0))
    assert any(q.responses == responses for q in train + val)


# ----------------------------------------------------------------------------------------------- the autopsy route


def test_the_autopsy_route_runs_between_decode_steps_with_the_ids_and_position_given(live, monkeypatch):
    calls = []
    import glassmind.autopsy as real

    inner = real.autopsy_json

    def spy(*a, **kw):
        calls.append((threading.current_thread().name, a[2], kw))
        return inner(*a, **kw)
    monkeypatch.setattr(real, "autopsy_json", spy)
    ids = live.served["tiny"].tok.encode("Hello world")
    r = live.http.post("/glassmind/autopsy", json={"model": "tiny", "ids": ids, "position": 2, "top_k": 3,
                                                   "ablate": False})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == [live.served["tiny"].tok.decode([i]) for i in ids]
    [(thread, got_ids, kw)] = calls
    assert thread.startswith("glassmind-scheduler-tiny") and got_ids == ids
    assert kw["position"] == 2 and kw["top_k"] == 3 and kw["ablate"] is False
    assert live.http.post("/glassmind/autopsy", json={"model": "tiny", "ids": [10**6]}).status_code == 400
    assert live.http.post("/glassmind/autopsy", json={"model": "tiny", "ids": ids, "position": 99}).status_code == 400


# ----------------------------------------------------------------------------------------------- load


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the RSS from /proc")
def test_32_streaming_clients_a_fifth_disconnecting_get_no_5xx_and_memory_returns(live):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 60, "ignore_eos": True, "stream": True,
            "temperature": 0.9, "stream_options": {"include_usage": True}}

    async def one(i, client):
        leave = i % 5 == 0           # 7 of 32 leave after a few chunks
        async with client.stream("POST", "/v1/chat/completions", json={**body, "seed": i}) as r:
            assert r.status_code < 500
            if r.status_code != 200:
                return ("status", r.status_code)
            n, raw = 0, []
            async for line in r.aiter_lines():
                raw.append(line)
                n += 1
                if leave and n >= 6:
                    return ("left", None)
            return ("done", "\n".join(raw))

    async def run():
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=60,
                                     limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(i, client) for i in range(32))), 90)

    asyncio.run(run())       # warm-up: allocator pools, lazily built objects
    base = _rss()
    outcomes = asyncio.run(run())
    assert [o for o, _ in outcomes].count("left") == 7 and [o for o, _ in outcomes].count("done") == 25
    for kind, raw in outcomes:
        if kind == "done":
            events = sse(raw.strip())
            assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 60
            assert events[-3]["choices"][0]["finish_reason"] == "length"
    sched = live.served["tiny"].scheduler
    t0 = time.time()
    while (sched.rows or sched.waiting) and time.time() - t0 < 5:
        time.sleep(0.02)
    assert not sched.rows and not sched.waiting and sched.batch.size == 0
    assert sched.batch.cache.k[0].shape[0] == 0
    grown = _rss() - base
    assert grown < 40 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over a second identical load"
    text = live.http.get("/metrics").text
    assert 'glassmind_requests_total{model="tiny",status="cancelled"}' in text


# ----------------------------------------------------------------------------------------------- the verb


def test_the_serve_verb_serves_runs_under_their_names_and_refuses_what_it_cannot(tmp_path, capsys):
    from glassmind.__main__ import main as glassmind
    from glassmind.serve.cli import ServeConfig, build
    from glassmind.model import save_model

    model, tok = tiny_run()
    for name in ("a/sft", "b/sft", "base"):
        save_model(model, tmp_path / name)
        tok.save(tmp_path / name)
    app, served = build([str(tmp_path / "a/sft"), str(tmp_path / "b/sft"), str(tmp_path / "base")], ServeConfig())
    assert [s.name for s in served] == ["a/sft", "b/sft", "base"]
    assert not any(s.scheduler.thread.is_alive() for s in served)   # they start with the app
    assert glassmind(["serve", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_compile_serves_the_eager_greedy_text_alone_and_in_a_changing_batch(tmp_path):
    """`glassmind serve --compile` (build with compile=True): decode steps through a CompiledStep whose batch
    and key sizes are dynamic; its greedy tokens equal the eager engine's for a request alone and for requests
    that join and leave each other's batch. Compiling takes most of this test's time (~10 s idle)."""
    from glassmind.infer import Engine, SamplingParams
    from glassmind.model import save_model
    from glassmind.serve.cli import ServeConfig, build

    model, tok = tiny_run()
    save_model(model, tmp_path / "tiny")
    tok.save(tmp_path / "tiny")
    app, served = build([str(tmp_path / "tiny")], ServeConfig(compile=True, dtype="fp32", preferences=str(tmp_path / "p.jsonl")))
    sched = served[0].scheduler
    assert sched.compiled is not None and sched.batch.compiled is sched.compiled
    sizes: list[int] = []
    step = sched.batch._compiled_step
    sched.batch._compiled_step = lambda tokens, mask4, col: (sizes.append(len(tokens)), step(tokens, mask4, col))[1]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]    # the warm-up's compilations
    assert graphs >= 2
    prompts = ["The quick brown", "def add(a, b):", "Hello world! How", "Numbers: 1 2"]
    lengths = [30, 12, 22, 17]
    engine = Engine(model, packed=False)
    refs = [engine.generate([tok.encode(p)], SamplingParams(max_new_tokens=n))[0] for p, n in zip(prompts, lengths)]
    want = [r.ids for r in refs]
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        def ask(i):
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompts[i], "max_tokens": lengths[i],
                                                   "temperature": 0, "ignore_eos": True, "return_token_ids": True,
                                                   "logprobs": 1})
            assert r.status_code == 200, r.text
            c = r.json()["choices"][0]
            # the logprobs too: a random model's greedy tokens repeat, and may survive a wrong cache slot
            assert c["logprobs"]["token_logprobs"] == pytest.approx(refs[i].logprobs, abs=1e-4)
            return c["token_ids"]

        assert ask(0) == want[0]                                      # alone: the batch-of-1 compilation
        got: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(i))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(4)] == want                    # batches of 2-4 rows, rows leaving
    assert 1 in sizes and max(sizes) >= 3 and len(set(sizes)) >= 3, sizes
    # rows that keep joining push the batch's cache column to the context's end (the step that reads every
    # slot) and past it (the cut of unused columns): compiled and eager steps agree throughout
    from glassmind.infer.continuous import RunningBatch

    C = model.config.context_length
    eager, comp = RunningBatch(model), RunningBatch(model, compiled=sched.compiled)
    toks = None
    for i in range(2 * C):
        if i % 40 == 0:
            p = tok.encode(prompts[(i // 40) % 4])
            new = [eager.admit([p]), comp.admit([p])]
            toks = new[0].argmax(-1) if toks is None else torch.cat([toks, new[0].argmax(-1)])
        if max(eager.lens) >= C - 1:                                 # the scheduler stops a row here
            eager.remove([0])
            comp.remove([0])
            toks = toks[1:]
        a, b = eager.step(toks), comp.step(toks)
        assert torch.allclose(a, b, atol=1e-4), f"step {i}, column {eager.col}"
        toks = a.argmax(-1)
    assert eager.col == comp.col
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs   # no batch size compiled anew
