"""The benchmark's processes (``python -m simulations.bench``): each started in its own process
group with a tag in its environment, sampled for memory, and all of them (Ray's and Flower's
descendants included, found by the tag) stopped when the benchmark ends, fails or is interrupted.
Linux only: it reads /proc.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from simulations.bench_figures import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TAG_VARIABLE = "FEDFT_BENCH_TAG"


UNSET_FOR_CHILDREN = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


class Processes:
    """Every process the benchmark starts (and their descendants, through the environment tag)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.needle = f"{TAG_VARIABLE}={self.tag}".encode()
        env = {k: v for k, v in os.environ.items() if k not in UNSET_FOR_CHILDREN}
        self.env = {**env, TAG_VARIABLE: self.tag, "FLWR_HOME": str(root / "flwr-home"),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
        (root / "flwr-home").mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen] = []
        self._tagged: dict[int, bool] = {}

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        with log.open("w") as handle:
            process = subprocess.Popen(args, cwd=REPO_ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.started.append(process)
        return process, log

    def tagged(self) -> list[int]:
        """Pids of the live processes carrying this run's tag."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid not in self._tagged:
                environ = _read(f"/proc/{pid}/environ")
                if not environ:
                    continue  # gone, or not ours to read
                tagged = self.needle in environ
                if not tagged and _parent(pid) == os.getpid():
                    continue  # forked here, not yet exec'd with the tagged environment: look again
                self._tagged[pid] = tagged
            if self._tagged[pid] and _alive(pid):
                found.append(pid)
        return found

    def stop_all(self, grace_s: float = 10.0) -> list[int]:
        """Stop every group started, then every tagged process left; return the pids that needed SIGKILL."""
        for process in self.started:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        self.started.clear()
        left = _wait_gone(self.tagged, min(5.0, grace_s))  # Ray's helpers leave by themselves once the driver is gone
        for pid in left:
            _signal_pid(pid, signal.SIGTERM)
        left = _wait_gone(self.tagged, 3.0)
        for pid in left:
            _signal_pid(pid, signal.SIGKILL)
        _wait_gone(self.tagged, 3.0)
        return left


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(list_pids, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = [pid for pid in list_pids() if _alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _parent(pid: int) -> int:
    fields = _read(f"/proc/{pid}/stat").rpartition(b")")[2].split()
    return int(fields[1]) if len(fields) > 1 else 0


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and b") Z " not in stat  # a zombie has exited; its parent reaps it


class TreeSampler:
    """Polls the tagged processes: the peak of their summed RSS (and, with ``pss``, of their summed PSS,
    which splits shared pages between the processes sharing them), the processes at the RSS peak, and
    every command line seen."""

    def __init__(self, processes: Processes, interval_s: float = 0.2, pss: bool = False) -> None:
        self.processes = processes
        self.interval_s = interval_s
        self.pss = pss
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = count = 0
            for pid in self.processes.tagged():
                statm = _read(f"/proc/{pid}/statm").split()
                if len(statm) < 2:
                    continue
                rss += int(statm[1]) * self._page
                pss += _pss(pid) if self.pss else 0
                count += 1
                cmdline = _read(f"/proc/{pid}/cmdline")  # read again: Ray renames a worker once it is an actor
                if cmdline:
                    self.seen[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace")
            if rss > self.peak_rss:
                self.peak_rss, self.peak_processes = rss, count
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.interval_s)

    def count(self, marker: str) -> int:
        """How many distinct processes whose command line holds ``marker`` were seen."""
        return sum(marker in cmd for cmd in self.seen.values())


def _pss(pid: int) -> int:
    """A process's proportional set size in bytes (0 when it is gone or the kernel has no smaps_rollup)."""
    for line in _read(f"/proc/{pid}/smaps_rollup").split(b"\n"):
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_for(process: subprocess.Popen, log: Path, what: str, timeout_s: float) -> float:
    """Wait for ``process`` to exit 0; its wall time from now. A failure names ``what`` with the log's tail."""
    started = time.monotonic()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout_s:.0f} s; log {log}:\n{tail(log)}") from None
    if code != 0:
        raise BenchError(f"{what} exited with {code}; log {log}:\n{tail(log)}")
    return time.monotonic() - started


def tail(log: Path, chars: int = 3000) -> str:
    return log_text(log)[-chars:] if log.exists() else "(no log)"


def log_text(log: Path) -> str:
    """A log as written: its progress bars' carriage returns kept (``read_text`` turns them into newlines)."""
    return log.read_bytes().decode(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not path:
        raise BenchError(f"{name} is not installed: install fedft (it brings flwr) in this environment")
    return path


def wait_until(ready, process: subprocess.Popen, log: Path, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode}; log {log}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} was not ready after {timeout_s:.0f} s; log {log}:\n{tail(log)}")
        time.sleep(0.3)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
