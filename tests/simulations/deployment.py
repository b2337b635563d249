"""Flower's Deployment Engine on 127.0.0.1 for tests: a SuperLink and institutions' SuperNodes
(and their resident workers) as real child processes, each in its own process group.

Used by tests/simulations/test_deployment.py (TLS, authentication, policies) and
tests/simulations/test_faults.py (processes killed mid-run). ``FLWR_HOME`` points into the
test's directory, so nothing lands in ~/.flwr.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedft.deploy.certs import make_certificates
from simulations.node_commands import supernode_command
from tests.conftest import REPO_ROOT

ROOT = REPO_ROOT
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is installed with fedft (flwr)"
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    pytest.fail(f"nothing listens on {port} after {timeout}s:\n{log.read_text()[-3000:]}")


class Deployment:
    """The coordinator's SuperLink and the institutions' SuperNodes, all as child processes."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.home = root / "flwr-home"  # FLWR_HOME of every process: nothing lands in ~/.flwr
        self.home.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(self.home),  # Flower starts its helpers from PATH
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.processes: list[subprocess.Popen] = []
        self.certs = make_certificates(root / "coordinator" / "certs", ["127.0.0.1", "localhost"])

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        handle = log.open("a")  # a restarted process appends to its log
        process = subprocess.Popen(args, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own group: stopped with its children
        self.processes.append(process)
        return process, log

    def start_superlink(self, database: Path | None = None) -> subprocess.Popen:
        """The SuperLink on ``self.port``; with ``database`` its state (registered SuperNodes, runs)
        lives in that SQLite file and survives a restart."""
        stored = ["--database", str(database)] if database is not None else []
        process, log = self.start("superlink", [
            tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-ca-certfile", str(self.certs["ca.crt"]), "--ssl-certfile", str(self.certs["server.crt"]),
            "--ssl-keyfile", str(self.certs["server.key"]), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", *stored])
        wait_for_port(self.port, process, log)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "coordinator"\n\n[superlink.coordinator]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca.crt"]}"\n')
        self.superlink_log = log
        self.superlink = process
        return process

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([tool("flwr"), *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def wait_online(self, count: int, timeout: float = 90) -> None:
        """Until the SuperLink lists ``count`` SuperNodes as online (a job then samples them all)."""
        deadline = time.monotonic() + timeout
        listed = ""
        while time.monotonic() < deadline:
            listed = self.flwr("supernode", "list", "coordinator", "--format", "json").stdout
            if listed.count('"online"') >= count:
                return
            time.sleep(1)
        pytest.fail(f"fewer than {count} SuperNodes online after {timeout}s:\n{listed[-2000:]}")

    def start_supernode(self, name: str, key: Path, data: Path | None, *, with_ca: bool = True,
                        max_retries: int | None = None, node_config: str = "",
                        poll_interval: float | None = None) -> tuple[subprocess.Popen, Path]:
        """``flower-supernode``, or with ``poll_interval`` the same through ``fedft node supernode``."""
        own = f"data-path='{data}' device='cpu' " if data is not None else ""
        launcher = supernode_command(tool("flower-supernode"), poll_interval)
        args = [*launcher, "--superlink", f"127.0.0.1:{self.port}",
                "--auth-supernode-private-key", str(key), "--port", str(free_port()),
                "--node-config", f"{own}{node_config}".strip()]
        if with_ca:
            args += ["--root-certificates", str(self.certs["ca.crt"])]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        return self.start(name, args)

    def start_worker(self, name: str, socket_path: Path, node_config: str) -> tuple[subprocess.Popen, Path]:
        """The institution's resident worker (``fedft node serve``), listening before its SuperNode starts."""
        process, log = self.start(name, [sys.executable, "-m", "simulations.cli", "node", "serve",
                                         "--socket", str(socket_path), "--node-config", node_config])
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        return process, log

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """SIGKILL a process and everything in its group (e.g. the SuperLink and its ServerApp:
        the coordinator's machine dies), and reap it."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def stop(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def wait_exit(process: subprocess.Popen, log: Path, timeout: float = 90) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the SuperNode is still running after {timeout}s:\n{log.read_text()[-3000:]}")
    return log.read_text()
