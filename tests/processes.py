"""Ray and Flower processes on this machine, so the suite can check that none outlives it.

``pytest_sessionfinish`` (tests/conftest.py) compares the processes running at the end of
the session with those running at its start; a Ray worker, raylet, GCS server or Flower
SuperLink / SuperNode / ClientApp / ServerApp that a test started and that is still alive
30 s after the last test fails the session, named with its pid and command line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MARKERS = ("ray::", "raylet", "gcs_server", "dashboard/agent.py", "runtime_env/agent", "log_monitor.py",
           "flower-superlink", "flower-supernode", "flwr-clientapp", "flwr-serverapp", "flwr-simulation",
           "node supernode")


def federation_processes() -> dict[int, str]:
    """pid -> command line of every Ray / Flower process visible in /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(marker in cmdline for marker in MARKERS):
            found[int(entry.name)] = cmdline
    return found


def leftovers(before: dict[int, str], wait_s: float = 30.0) -> dict[int, str]:
    """The processes not in ``before`` that are still alive after up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        left = {pid: cmd for pid, cmd in federation_processes().items() if pid not in before}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)
