"""Flower's Deployment Engine on 127.0.0.1, as institutions run it: real processes, real TLS.

A ``flower-superlink`` with TLS (certificates from ``fedft certs``) and SuperNode
authentication; two institutions' ``flower-supernode`` processes, each registered with
``flwr supernode register`` and pointed at its own JSONL file through ``--node-config``; a
2-round job started with ``flwr run``. In the same family: a SuperNode whose key was never
registered is refused, and one that does not have the CA certificate cannot connect.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedft.demo.tasks import make_demo_rows, write_jsonl
from fedft.deploy.certs import make_certificates, make_node_key
from tests.conftest import REPO_ROOT, TINY_TOML, write_tiny_model

pytestmark = pytest.mark.slow

ROOT = REPO_ROOT
BIN = Path(sys.executable).parent
ROWS = {"inst-a": 24, "inst-b": 16}  # different sizes: the round's example count shows who trained


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is installed with fedft (flwr)"
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
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
        self.port = _free_port()
        self.home = root / "flwr-home"  # FLWR_HOME of every process: nothing lands in ~/.flwr
        self.home.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(self.home),  # Flower starts its helpers from PATH
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.processes: list[subprocess.Popen] = []
        self.certs = make_certificates(root / "coordinator" / "certs", ["127.0.0.1", "localhost"])

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        handle = log.open("w")
        process = subprocess.Popen(args, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own group: stopped with its children
        self.processes.append(process)
        return process, log

    def start_superlink(self) -> None:
        process, log = self.start("superlink", [
            _tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-ca-certfile", str(self.certs["ca.crt"]), "--ssl-certfile", str(self.certs["server.crt"]),
            "--ssl-keyfile", str(self.certs["server.key"]), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation"])
        _wait_for_port(self.port, process, log)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "coordinator"\n\n[superlink.coordinator]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca.crt"]}"\n')
        self.superlink_log = log

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("flwr"), *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start_supernode(self, name: str, key: Path, data: Path, *, with_ca: bool = True,
                        max_retries: int | None = None) -> tuple[subprocess.Popen, Path]:
        args = [_tool("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--auth-supernode-private-key", str(key), "--port", str(_free_port()),
                "--node-config", f"data-path='{data}' device='cpu'"]
        if with_ca:
            args += ["--root-certificates", str(self.certs["ca.crt"])]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        return self.start(name, args)

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


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    model = write_tiny_model(root / "tiny-llama")
    coordinator = root / "coordinator"
    write_jsonl([r for r in make_demo_rows(2, 4, 0.5, seed=1)], coordinator / "eval.jsonl")
    # the coordinator's config names no training data: each institution brings its own
    config = TINY_TOML.format(model=model).replace('train_files = ["train.jsonl"]\n', "")
    (coordinator / "deploy.toml").write_text(config)
    rows = make_demo_rows(2, 24, 0.9, seed=0)
    for index, (name, count) in enumerate(ROWS.items()):
        institution = root / name
        write_jsonl([r for r in rows if r["institution"] == f"inst{index}"][:count], institution / "train.jsonl")
        make_node_key(institution / "keys", "node")
    make_node_key(root / "stranger" / "keys", "node")  # never registered
    deploy = Deployment(root)
    try:
        deploy.start_superlink()
        for name in ROWS:
            done = deploy.flwr("supernode", "register", str(root / name / "keys" / "node.pub"), "coordinator")
            assert done.returncode == 0 and "registered" in done.stdout, done.stdout + done.stderr
        yield deploy
    finally:
        deploy.stop()


def _wait_exit(process: subprocess.Popen, log: Path, timeout: float = 90) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the SuperNode is still running after {timeout}s:\n{log.read_text()[-3000:]}")
    return log.read_text()


def test_an_unregistered_supernode_is_refused(deployment):
    stranger = deployment.root / "stranger"
    process, log = deployment.start_supernode("stranger", stranger / "keys" / "node", stranger / "train.jsonl",
                                              max_retries=1)
    text = _wait_exit(process, log)
    assert process.returncode != 0
    assert "Failed to activate SuperNode" in text, text[-3000:]
    assert "No SuperNode found with the given public key" in deployment.superlink_log.read_text()


def test_a_supernode_without_the_ca_certificate_cannot_connect(deployment):
    institution = deployment.root / "inst-a"  # a registered key: TLS fails before authentication
    process, log = deployment.start_supernode("no-ca", institution / "keys" / "node", institution / "train.jsonl",
                                              with_ca=False, max_retries=1)
    text = _wait_exit(process, log)
    assert process.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in text, text[-3000:]


def test_two_registered_institutions_train_over_tls(deployment):
    for name in ROWS:
        institution = deployment.root / name
        deployment.start_supernode(name, institution / "keys" / "node", institution / "train.jsonl")
    out = deployment.root / "coordinator" / "run"
    config = deployment.root / "coordinator" / "deploy.toml"
    done = deployment.flwr(
        "run", ".", "coordinator", "--stream", "--run-config",
        f"config='{config}' overrides='strategy.num_rounds=2 train.local_steps=1' out-dir='{out}'",
        timeout=240)
    logs = "\n".join(f"--- {name}\n{(deployment.root / f'{name}.log').read_text()[-2000:]}" for name in ROWS)
    assert (out / "adapter" / "adapter_model.safetensors").is_file(), done.stdout[-3000:] + done.stderr[-3000:] + logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == 2 and row["rejected_updates"] == [] and row["client_failures"] == []
        assert row["num_examples"] == sum(ROWS.values())  # each institution trained on its own file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["data"]["train_files"] == []
    run_files = " ".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.suffix in {".json", ".jsonl"})
    assert "inst-a" not in run_files and "inst-b" not in run_files  # no institution path reached the server
