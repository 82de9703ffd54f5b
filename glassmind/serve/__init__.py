"""Serving: `glassmind serve RUN`, an OpenAI-compatible server with continuous batching and a web page.

app.py (FastAPI routes), scheduler.py (the thread that owns the model), protocol.py (request checks, the
error envelope), metrics.py (Prometheus text), cli.py (the verb), web/ (the page's static files)."""
