"""Start `torchrun --nproc_per_node=N` from Python with a deadline, and always clean up after it.

Tests and benchmarks launch process groups; a hung collective must never hang them. torchrun and its
workers run in a new session (their own process group), so on timeout or on any error the whole tree is
killed at once: SIGTERM, a short grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass
class LaunchResult:
    returncode: int | None   # None when killed at the deadline
    timed_out: bool
    seconds: float
    output: str              # stdout and stderr of torchrun and every rank, interleaved

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def torchrun(args: list[str], *, nproc: int, timeout: float, env: dict | None = None,
             cwd: str | None = None) -> LaunchResult:
    """Run `torchrun --standalone --nproc_per_node=nproc ARGS...` (ARGS: a script and its arguments, or
    `-m module ...`) and wait at most `timeout` seconds. `--standalone` picks a free port, so launches by
    several people on one machine do not collide."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return LaunchResult(proc.returncode, False, time.monotonic() - start, out)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate()
        return LaunchResult(None, True, time.monotonic() - start, out)
    finally:
        kill_tree(proc)  # also any worker torchrun left behind, and on KeyboardInterrupt


def kill_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop torchrun and every worker: they share the session (process group) torchrun leads.
    SIGTERM, up to `grace` seconds to exit, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(proc):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(proc):
            time.sleep(0.05)


def group_alive(proc: subprocess.Popen) -> bool:
    """Is any process of the group left? Reaps torchrun first: a zombie leader still counts as a member."""
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
