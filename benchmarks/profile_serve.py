"""Where a `glassmind serve` process spends its time under 16 streaming clients: py-spy samples the server
(every thread, 200 Hz, 10 s) while bench_serve.py's clients load it, and the share of samples under each
function is printed (a sample counts once per function on its stack).

    pip install py-spy && python benchmarks/profile_serve.py [--run RUN]

The model is bench_serve.py's: the demo's trained decoder (vocab 4096), from --run or bench_serve's cache;
server --max-batch 16 --threads 1; 160 requests x 64 tokens, 16 at a time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_serve as B  # noqa: E402


def name_of(frame: str) -> str:
    """'func (path/file.py:123)' -> 'func (file.py)': one entry per function, whatever the line."""
    m = re.match(r"(.*) \((.*):\d+\)$", frame)
    return f"{m.group(1)} ({os.path.basename(m.group(2))})" if m else frame


def main() -> int:
    if shutil.which("py-spy") is None:
        print("needs py-spy: pip install py-spy")
        return 2
    import httpx

    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a decoder run (default: bench_serve.py's demo decoder)")
    ap.add_argument("--cache", default=str(B.ROOT / "runs" / "bench-serve"))
    args = ap.parse_args()
    run = Path(args.run) if args.run else B.demo_decoder(Path(args.cache))
    print(B.describe(run), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(B.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        port = 8179
        srv = subprocess.Popen([sys.executable, "-m", "glassmind", "serve", str(run), "--port", str(port),
                                "--threads", "1"], env=env)
        url = f"http://127.0.0.1:{port}"
        raw = Path(tmp) / "spy.txt"
        try:
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            spy = subprocess.Popen(["py-spy", "record", "-p", str(srv.pid), "-o", str(raw), "-f", "raw", "-d", "10",
                                    "-r", "200", "--threads"])
            asyncio.run(B.level(url, 16, 160, 64, run.name, srv.pid))  # outlasts the 10 s of sampling
            spy.wait()
        finally:
            srv.terminate()
            srv.wait(timeout=30)
        total, n = collections.Counter(), 0
        for line in raw.read_text().splitlines():
            stack, count = line.rsplit(" ", 1)
            n += int(count)
            for frame in {name_of(f) for f in stack.split(";")}:
                total[frame] += int(count)
    print(f"{n} samples; share of samples with the function on the stack:")
    for frame, c in total.most_common(40):
        print(f"{100 * c / n:5.1f}%  {frame[:140]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
