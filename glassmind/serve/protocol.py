"""The OpenAI request bodies, checked field by field, and the error envelope.

Every refusal is an ApiError that app.py answers as `{"error": {"message", "type", "param", "code"}}` with a
4xx status. Messages name the field and what it must be, never the value that was sent (a server that echoes
input back reflects whatever a caller puts there). As OpenAI does, an unknown field is refused (400) rather
than silently ignored: a misspelt `max_token` would otherwise generate 16 tokens without a word.

glassmind's extra fields (documented in the README): top_k, min_p, repetition_penalty, use_beam_search,
num_beams, length_penalty, ignore_eos, return_token_ids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

MAX_BODY = 2 * 1024 * 1024
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "stop",
          "seed", "presence_penalty", "frequency_penalty", "user", "logit_bias",
          # glassmind's extras
          "top_k", "min_p", "repetition_penalty", "use_beam_search", "num_beams", "length_penalty", "ignore_eos",
          "return_token_ids"}
FIELDS = {"completions": COMMON | {"prompt", "echo", "best_of", "suffix"},
          "chat": COMMON | {"messages", "max_completion_tokens", "top_logprobs"}}
ROLES = ("system", "developer", "user", "assistant")


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), "another type")


def _int(body: dict, name: str, lo: int, hi: int | None, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"`{name}` must be an integer, got {_type_name(v)}", "invalid_type")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad(name, f"`{name}` must be {rng}")
    return v


def _num(body: dict, name: str, lo: float, hi: float | None, default, *, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(name, f"`{name}` must be a number, got {_type_name(v)}", "invalid_type")
    v = float(v)
    if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        rng = f"in {left}{lo:g}, {hi:g}]" if hi is not None else f"{'>' if lo_open else '>='} {lo:g}"
        raise bad(name, f"`{name}` must be {rng}")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"`{name}` must be a boolean, got {_type_name(v)}", "invalid_type")
    return v


@dataclass
class Parsed:
    kind: str                       # "completions" | "chat"
    model: str
    prompt: Any                     # completions: str | list[str] | list[int] | list[list[int]]
    messages: list[dict] | None     # chat: [{"role", "content": str}]
    max_tokens: int | None
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int | None
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None            # None = off; else how many alternatives (0..20)
    beam: bool
    num_beams: int
    length_penalty: float
    ignore_eos: bool
    return_token_ids: bool


def parse(body: Any, kind: str) -> Parsed:
    """Check a decoded JSON body of /v1/completions (kind "completions") or /v1/chat/completions ("chat")."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_body")
    unknown = sorted(k for k in body if k not in FIELDS[kind])
    if unknown:
        # name at most a few, each cut short: the names are the caller's text
        # named only when they are plain identifiers: a name is the caller's text, never reflected otherwise
        names = [k for k in unknown if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,39}", k)]
        said = f": {', '.join(names[:3])}" if len(names) == len(unknown) and len(names) <= 3 else ""
        raise ApiError(400, f"unrecognized request argument(s){said}; see the README's serve section for the "
                            "fields glassmind accepts", param=None, code="unknown_field")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "`model` is required: a string naming one of /v1/models", "missing_model")

    prompt = messages = None
    if kind == "completions":
        prompt = body.get("prompt")
        ok = (isinstance(prompt, str)
              or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
              or (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in prompt))
              or (isinstance(prompt, list) and prompt and all(
                  isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                  for p in prompt)))
        if not ok:
            raise bad("prompt", "`prompt` must be a string, an array of strings, an array of token ids or an "
                                "array of token id arrays (non-empty)", "invalid_type")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) > MAX_N:
            raise bad("prompt", f"at most {MAX_N} prompts per request")
        if body.get("echo") not in (None, False):
            raise bad("echo", "`echo` is not supported", "unsupported")
        if body.get("suffix") is not None:
            raise bad("suffix", "`suffix` is not supported", "unsupported")
    else:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise bad("messages", f"`messages` must be an array, got {_type_name(messages)}", "invalid_type")
        if not messages:
            raise bad("messages", "`messages` must hold at least one message")
        clean = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise bad(where, f"`{where}` must be an object with `role` and `content`", "invalid_type")
            extra = [k for k in m if k not in ("role", "content", "name")]
            if extra:
                raise bad(where, f"`{where}` may hold only `role`, `content` and `name`", "unknown_field")
            role = m.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise bad(f"{where}.role", f"`{where}.role` must be one of {', '.join(ROLES)}")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           and set(p) <= {"type", "text"} for p in content):
                    raise bad(f"{where}.content", f"`{where}.content` parts must be {{\"type\": \"text\", "
                                                  "\"text\": string}: this model reads text only", "invalid_type")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise bad(f"{where}.content", f"`{where}.content` must be a string or an array of text parts, "
                                              f"got {_type_name(content)}", "invalid_type")
            clean.append({"role": "system" if role == "developer" else role, "content": content})
        if clean[-1]["role"] == "assistant":
            raise bad("messages", "the last message must not be the assistant's: the model writes that one")
        messages = clean

    max_tokens = _int(body, "max_tokens", 1, None, None)
    if kind == "chat":
        mct = _int(body, "max_completion_tokens", 1, None, None)
        if mct is not None and max_tokens is not None and mct != max_tokens:
            raise bad("max_completion_tokens", "`max_tokens` and `max_completion_tokens` disagree: send one")
        max_tokens = mct if mct is not None else max_tokens
    n = _int(body, "n", 1, MAX_N, 1)
    temperature = _num(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1, None, 0)
    min_p = _num(body, "min_p", 0.0, 1.0, 0.0)
    repetition_penalty = _num(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True)
    seed = _int(body, "seed", 0, 2**63 - 1 - MAX_N, None)
    for name in ("presence_penalty", "frequency_penalty"):
        if _num(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise bad(name, f"`{name}` is not supported (use the extra field `repetition_penalty`)", "unsupported")
    lb = body.get("logit_bias")
    if lb is not None and (not isinstance(lb, dict) or lb):
        raise bad("logit_bias", "`logit_bias` is not supported", "unsupported")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"`user` must be a string, got {_type_name(user)}", "invalid_type")

    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("stop", "`stop` must be a string or an array of strings", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop sequences")
    if any(not s for s in stops):
        raise bad("stop", "a stop sequence must not be empty")

    stream = _bool(body, "stream", False)
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not stream:
            raise bad("stream_options", "`stream_options` needs `stream: true`")
        if not isinstance(so, dict) or set(so) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options", "`stream_options` must be an object with `include_usage`", "invalid_type")
        include_usage = _bool(so, "include_usage", False)

    if kind == "chat":
        want = _bool(body, "logprobs", False)
        top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
        if top is not None and not want:
            raise bad("top_logprobs", "`top_logprobs` needs `logprobs: true`")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
        bo = _int(body, "best_of", 1, MAX_N, None)
        if bo is not None and bo != n:
            raise bad("best_of", "`best_of` other than `n` is not supported", "unsupported")

    beam = _bool(body, "use_beam_search", False)
    num_beams = _int(body, "num_beams", 1, MAX_N, max(4, n))
    if beam and n > num_beams:
        raise bad("n", "with beam search `n` (the best beams returned) cannot exceed `num_beams`")
    if beam and stream:
        raise bad("stream", "beam search cannot stream: its best reply is known only when every beam has ended; "
                            "send it with stream false, or sample (temperature > 0) to stream")
    length_penalty = _num(body, "length_penalty", -10.0, 10.0, 1.0)
    return Parsed(kind, model, prompt, messages, max_tokens, n, temperature, top_p, max(top_k, 0), min_p,
                  repetition_penalty, seed, stops, stream, include_usage, logprobs, beam, num_beams, length_penalty,
                  _bool(body, "ignore_eos", False), _bool(body, "return_token_ids", False))
