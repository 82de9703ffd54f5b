"""A tiny served model for the serve tests: a byte-level BPE with the chat tokens and a random 2-layer decoder,
behind a real uvicorn server on 127.0.0.1 (a free port), in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
import warnings

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
        "Hello world! How are you today? I am fine, thank you. Numbers: 1 2 3 4 5 6 7 8 9 10.\n") * 20


def tiny_run(context: int = 96, seed: int = 0):
    from glassmind.model import ModelConfig, Transformer
    from glassmind.tokenizer.bpe import BPETokenizer
    from glassmind.tokenizer.chat import add_chat_tokens

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = BPETokenizer.train([TEXT], 300, progress=False)
    add_chat_tokens(tok)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, context_length=context, d_model=32, n_heads=4,
                                    n_layers=2)).eval()
    return model, tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` in a thread; `url` is its base URL."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 20 or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_app(tmp_path, *, max_batch=16, max_queue=64, api_key=None, models=None):
    from glassmind.serve.app import create_app, make_served
    from glassmind.serve.metrics import Metrics

    metrics = Metrics()
    models = models or {"tiny": tiny_run()}
    served = [make_served(name, m, t, max_batch=max_batch, max_queue=max_queue, metrics=metrics)
              for name, (m, t) in models.items()]
    app = create_app(served, api_key=api_key, preferences=tmp_path / "prefs.jsonl", metrics=metrics)
    return app, served
