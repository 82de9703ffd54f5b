"""`glassmind serve RUN [RUN...]`: serve runs over HTTP with the OpenAI API, metrics and a web page.

    glassmind serve runs/demo/sft --port 8000
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "sft", "messages": [{"role": "user", "content": "hi"}]}'

Each run is served under its directory's name (the parent's too when two share a name). The server
listens on 127.0.0.1 unless --host says otherwise; give --api-key before exposing it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from glassmind.common import GlassmindError, add_config_args, config_from_args, run_main


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    max_batch: int = field(default=16, metadata={"help": "rows in the decode batch (requests x n) at most"})
    max_queue: int = field(default=64, metadata={"help": "requests that may wait; more get 429 at once"})
    api_key: Optional[str] = field(default=None, metadata={"help": "require `Authorization: Bearer KEY` "
                                                                   "(default: $GLASSMIND_API_KEY, else none)"})
    preferences: str = field(default="preferences.jsonl", metadata={"help": "the preference JSONL the page's "
                                                                            "ranking view appends to"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 weights where this machine computes bf16 "
                                                          "natively, else fp32) | fp32 | bf16 | fp16"})
    compile: bool = field(default=False, metadata={"help": "run decode steps through a torch.compile'd step "
                                                           "(compiled at start: tens of seconds; needs a C++ "
                                                           "compiler)"})
    threads: Optional[int] = field(default=None, metadata={"help": "CPU threads for torch"})


def model_names(runs: list[str]) -> list[str]:
    names = [Path(r).resolve().name for r in runs]
    out = []
    for r, n in zip(runs, names):
        p = Path(r).resolve()
        out.append(n if names.count(n) == 1 else f"{p.parent.name}/{n}")
    if len(set(out)) != len(out):
        raise GlassmindError("two runs would be served under the same name: serve each once")
    return out


def build(runs: list[str], cfg: ServeConfig):
    """(app, served): load every run and make the app (the schedulers start with the app)."""
    from glassmind.infer.generate import load_run
    from glassmind.serve.app import create_app, make_served
    from glassmind.serve.metrics import Metrics

    if cfg.max_batch < 1 or cfg.max_queue < 1:
        raise GlassmindError("--max-batch and --max-queue must be >= 1")
    if not 0 < cfg.port < 65536:
        raise GlassmindError("--port must be in 1..65535")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    # Two threads share the interpreter: the scheduler (many short torch calls, each releasing the GIL) and the
    # event loop. At the default 5 ms switch interval the event loop may keep the GIL for 5 ms after every
    # release, so a decode step of ~50 calls would wait far longer than it computes; 0.1 ms bounds that wait.
    sys.setswitchinterval(1e-4)
    metrics = Metrics()
    served = []
    for run, name in zip(runs, model_names(runs)):
        model, tok = load_run(run, device=cfg.device, dtype=cfg.dtype)
        if model.config.arch != "decoder":
            raise GlassmindError(f"{run} is a {model.config.arch}; serve runs decoders")
        if cfg.compile:
            print(f"compiling {name}'s decode step (batches of 1, and of 2 or more) ...", flush=True)
        served.append(make_served(name, model, tok, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                                  metrics=metrics, compile=cfg.compile))
    key = cfg.api_key or os.environ.get("GLASSMIND_API_KEY") or None
    return create_app(served, api_key=key, preferences=cfg.preferences, metrics=metrics), served


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        parser = argparse.ArgumentParser(prog="glassmind serve", description=__doc__.split("\n")[0],
                                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
        parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (decoders) to serve")
        add_config_args(parser, ServeConfig)
        ns = parser.parse_args(argv)
        cfg = config_from_args(ServeConfig, ns)
        try:
            import uvicorn
        except ImportError:
            raise GlassmindError("serving needs FastAPI and uvicorn: pip install 'glassmind[serve]'") from None
        app, served = build(ns.runs, cfg)
        names = ", ".join(s.name for s in served)
        print(f"serving {names} on http://{cfg.host}:{cfg.port}  (page: /, API: /v1, metrics: /metrics)", flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
        return 0

    return run_main(body, argv)
