"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand: a few counters, gauges
and histograms do not need a client library. Every series has a `model` label. The names (documented in the
README's serve section; vLLM's `vllm:*` metrics are the model):

    glassmind_requests_running            gauge      requests with a row in the decode batch
    glassmind_requests_waiting            gauge      requests in the queue
    glassmind_requests_total{status}      counter    finished requests: ok | cancelled | rejected
    glassmind_prompt_tokens_total         counter    prompt tokens prefilled
    glassmind_generation_tokens_total     counter    tokens generated
    glassmind_batch_rows                  gauge      rows in the decode batch after the last step
    glassmind_batch_occupancy             histogram  rows / max_batch, per decode step
    glassmind_time_to_first_token_seconds histogram  arrival to first token
    glassmind_inter_token_latency_seconds histogram  gap between a request's consecutive decode steps
    glassmind_request_queue_time_seconds  histogram  arrival to admission into the batch
    glassmind_e2e_request_latency_seconds histogram  arrival to last token
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
RATIO_BUCKETS = (0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)

HELP = {
    "glassmind_requests_running": ("gauge", "Requests with a row in the decode batch."),
    "glassmind_requests_waiting": ("gauge", "Requests waiting in the queue."),
    "glassmind_requests_total": ("counter", "Finished requests by status (ok, cancelled, rejected)."),
    "glassmind_prompt_tokens_total": ("counter", "Prompt tokens prefilled."),
    "glassmind_generation_tokens_total": ("counter", "Tokens generated."),
    "glassmind_batch_rows": ("gauge", "Rows in the decode batch after the last step."),
    "glassmind_batch_occupancy": ("histogram", "Rows in the decode batch / max_batch, per decode step."),
    "glassmind_time_to_first_token_seconds": ("histogram", "Time from arrival to the first token."),
    "glassmind_inter_token_latency_seconds": ("histogram", "Time between a request's consecutive tokens."),
    "glassmind_request_queue_time_seconds": ("histogram", "Time from arrival to admission into the batch."),
    "glassmind_e2e_request_latency_seconds": ("histogram", "Time from arrival to the last token."),
}


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)   # the last one is +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x
        self.n += 1


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.values: dict[tuple[str, tuple], float] = {}
        self.hists: dict[tuple[str, tuple], _Histogram] = {}

    def _add(self, name: str, labels: tuple, x: float, *, set_: bool = False) -> None:
        with self.lock:
            key = (name, labels)
            self.values[key] = x if set_ else self.values.get(key, 0.0) + x

    def _observe(self, name: str, labels: tuple, x: float, buckets=LATENCY_BUCKETS) -> None:
        with self.lock:
            h = self.hists.setdefault((name, labels), _Histogram(buckets))
            h.observe(x)

    # what the scheduler and the app report
    def waiting(self, model, n): self._add("glassmind_requests_waiting", (("model", model),), n, set_=True)
    def running(self, model, n): self._add("glassmind_requests_running", (("model", model),), n, set_=True)
    def prompt_tokens(self, model, n): self._add("glassmind_prompt_tokens_total", (("model", model),), n)
    def generation_tokens(self, model, n): self._add("glassmind_generation_tokens_total", (("model", model),), n)
    def ttft(self, model, s): self._observe("glassmind_time_to_first_token_seconds", (("model", model),), s)
    def itl(self, model, s): self._observe("glassmind_inter_token_latency_seconds", (("model", model),), s)
    def queued(self, model, s): self._observe("glassmind_request_queue_time_seconds", (("model", model),), s)

    def occupancy(self, model, rows, max_rows):
        self._add("glassmind_batch_rows", (("model", model),), rows, set_=True)
        self._observe("glassmind_batch_occupancy", (("model", model),), rows / max_rows, RATIO_BUCKETS)

    def finished(self, model, status, e2e: float | None = None):
        self._add("glassmind_requests_total", (("model", model), ("status", status)), 1)
        if e2e is not None:
            self._observe("glassmind_e2e_request_latency_seconds", (("model", model),), e2e)

    def ensure(self, model: str) -> None:
        """Zero series for a model, so that every documented name is present before the first request."""
        for name in ("glassmind_requests_running", "glassmind_requests_waiting", "glassmind_prompt_tokens_total",
                     "glassmind_generation_tokens_total", "glassmind_batch_rows"):
            self._add(name, (("model", model),), 0)
        self._add("glassmind_requests_total", (("model", model), ("status", "ok")), 0)
        for name in ("glassmind_time_to_first_token_seconds", "glassmind_inter_token_latency_seconds",
                     "glassmind_request_queue_time_seconds", "glassmind_e2e_request_latency_seconds"):
            with self.lock:
                self.hists.setdefault((name, (("model", model),)), _Histogram(LATENCY_BUCKETS))
        with self.lock:
            self.hists.setdefault(("glassmind_batch_occupancy", (("model", model),)), _Histogram(RATIO_BUCKETS))

    def render(self) -> str:
        def fmt_labels(labels, extra=()):
            items = list(labels) + list(extra)
            if not items:
                return ""
            esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
            return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"

        lines: list[str] = []
        with self.lock:
            values = dict(self.values)
            hists = {k: (h.buckets, list(h.counts), h.sum, h.n) for k, h in self.hists.items()}
        for name, (kind, text) in HELP.items():
            series = [(lab, v) for (n, lab), v in values.items() if n == name]
            hs = [(lab, h) for (n, lab), h in hists.items() if n == name]
            if not series and not hs:
                continue
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for lab, v in sorted(series):
                lines.append(f"{name}{fmt_labels(lab)} {v:g}")
            for lab, (buckets, counts, total, n) in sorted(hs, key=lambda x: x[0]):
                acc = 0
                for b, c in zip(buckets, counts):
                    acc += c
                    lines.append(f"{name}_bucket{fmt_labels(lab, [('le', f'{b:g}')])} {acc}")
                lines.append(f"{name}_bucket{fmt_labels(lab, [('le', '+Inf')])} {n}")
                lines.append(f"{name}_sum{fmt_labels(lab)} {total:g}")
                lines.append(f"{name}_count{fmt_labels(lab)} {n}")
        return "\n".join(lines) + "\n"
