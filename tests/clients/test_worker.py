"""The resident worker (``fedft node serve``): a real process, the base loaded once for every round.

The worker runs as the institution would start it, a child process with its own node
config; the ClientApp (``clients.app.train``, called here as ``flwr-clientapp`` would) has
only ``worker='SOCKET'`` in its node config and forwards each round. The full deployment
over a SuperLink and SuperNodes is tests/simulations/test_deployment.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedft.config import load_config
from fedft.demo.tasks import make_demo_rows, write_jsonl
from fedft.federated import wire
from tests.clients.inprocess import deliver, institution, train_message
from tests.conftest import REPO_ROOT


def start_worker(socket_path: Path, node_config: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "node", "serve", "--socket", str(socket_path),
         "--node-config", node_config], cwd=REPO_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return process


def stop_worker(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:  # pragma: no cover - a hung worker
        process.kill()


@pytest.fixture
def site(tiny_config_path, tmp_path):
    cfg = load_config(tiny_config_path, ["train.local_steps=2"])
    data = tmp_path / "hospital" / "train.jsonl"
    write_jsonl([r for r in make_demo_rows(2, 24, 0.9, seed=0) if r["institution"] == "inst0"][:12], data)
    return cfg, data, tmp_path


def _initial_state(cfg) -> dict:
    from fedft.model.load import initial_adapter_state, model_spec

    return initial_adapter_state(model_spec(cfg))


@pytest.mark.slow
def test_rounds_through_the_worker_load_the_base_once_and_equal_in_process_rounds(site):
    cfg, data, root = site
    socket_path = root / "run" / "worker.sock"
    log = root / "worker.log"
    worker = start_worker(socket_path, f"data-path='{data}' device='cpu' state-dir='{root / 'state'}'", log)
    try:
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        forwarded = institution({"worker": str(socket_path)})  # the SuperNode knows only the socket
        local = institution({"data-path": str(data), "device": "cpu", "state-dir": str(root / "state-local")})
        state = _initial_state(cfg)
        for round_index in (1, 2, 3):
            messages = [train_message(cfg, state, round_index) for _ in range(2)]
            if round_index == 3:  # a SCAFFOLD correction travels to the worker beside the adapter
                from flwr.app import ArrayRecord

                for message in messages:
                    message.content[wire.CORRECTION] = ArrayRecord(
                        torch_state_dict={k: torch.full_like(v, 0.01) for k, v in state.items()})
            via_worker, in_process = deliver(messages[0], forwarded), deliver(messages[1], local)
            assert not via_worker.has_error(), via_worker.error.reason
            got = via_worker.content[wire.ARRAYS].to_torch_state_dict()
            want = in_process.content[wire.ARRAYS].to_torch_state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
            assert dict(via_worker.content[wire.METRICS]) == dict(in_process.content[wire.METRICS])
            assert (wire.LR_SUM in via_worker.content[wire.METRICS]) is (round_index == 3)
            state = got
    finally:
        stop_worker(worker)
    text = log.read_text()
    assert "round 3 of run 1 done" in text and "base loads in this worker: 1, rounds: 3" in text, text[-3000:]
    trail = (root / "state" / "audit-trail.jsonl").read_text().splitlines()
    assert len(trail) == 3  # the worker keeps the institution's audit trail
    assert not socket_path.exists() and worker.returncode == 0


def test_a_missing_worker_fails_the_round_with_a_fixed_sentence(site):
    cfg, _, root = site
    reply = deliver(train_message(cfg, {}, 1), institution({"worker": str(root / "nobody.sock")}))
    assert reply.has_error()
    assert reply.error.reason == "fedft-failed: WorkerUnavailable: its resident worker did not answer"
    assert str(root) not in reply.error.reason


def test_the_client_app_that_forwards_imports_neither_torch_nor_transformers():
    """Nor does checking its reply (torch's import was 1.2 s of every deployed round on 2 cores)."""
    code = ("import sys, numpy, clients.app\n"
            "from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict\n"
            "from fedft.federated import wire\n"
            "a = ArrayRecord({'m.q_proj.lora_A.weight': Array(numpy.zeros((2, 4), dtype=numpy.float32))})\n"
            "m = MetricRecord({wire.NUM_EXAMPLES: 3})\n"
            "clients.app.guard_reply(RecordDict({wire.ARRAYS: a, wire.METRICS: m}))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_socket_path_in_use_is_refused_and_a_stale_one_replaced(tmp_path):
    import socket

    from clients.worker import WorkerError, bind_socket

    path = tmp_path / "w.sock"
    live = bind_socket(path)
    try:
        with pytest.raises(WorkerError, match="already listens"):
            bind_socket(path)
    finally:
        live.close()  # the file stays: a stale socket, as after a crash
    assert path.exists()
    again = bind_socket(path)
    again.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkerError, match="not a socket"):
        bind_socket(tmp_path / "file")
    assert isinstance(again, socket.socket) and os.path.exists(path)
