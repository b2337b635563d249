"""The institution's resident worker (``fedft node serve``): the 4-bit base stays loaded between rounds.

Flower's ``flwr-clientapp`` runs one ClientApp per message in a fresh process, which would
import torch and load and quantize the base every round. The worker is a process the
institution starts beside its SuperNode; it listens on a Unix socket (mode 0600, refusing
peers of another user) and runs each round the ClientApp forwards (clients/app.py) with
``clients.institution.run_round``: the institution's own node config and policy, its audit
trail, the model cached for the life of the process (``fedft.model.load.cached_peft_model``),
its data tokenized once. The coordinator can neither reach nor configure it: the socket is
local, and nothing in a train message changes the worker's node config. Rounds run one at a
time.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from clients.institution import RoundRequest, log, run_round
from clients.worker_link import CORRECTION_PREFIX, read_frame, write_frame

REQUEST_TIMEOUT_S = 60.0  # to receive one request, once connected


def _peer_gone(conn: socket.socket) -> bool:
    """True when the peer has closed its end (a read would return nothing)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class WorkerError(RuntimeError):
    """The worker cannot start: its socket path is taken or unusable (the message says which)."""


def _peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's user id (Linux SO_PEERCRED), or None where the platform has none."""
    if not hasattr(socket, "SO_PEERCRED"):  # pragma: no cover - Linux has it
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` that only this user can connect to.

    A stale socket file (no process listens) is replaced; a live worker's is refused.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise WorkerError(f"{path} exists and is not a socket; choose another --socket path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise WorkerError(f"a worker already listens on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600: no other user can connect
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(4)
    return server


def base_loads() -> int:
    """How many times this process loaded (and quantized) a base model."""
    from fedft.model.load import LOAD_COUNTS

    return sum(LOAD_COUNTS.values())


class Worker:
    """Runs forwarded rounds with one institution's node config; node state kept per run."""

    def __init__(self, node_config: Mapping) -> None:
        self.node_config = dict(node_config)
        self.states: dict[int, dict] = {}
        self.rounds = 0

    def handle(self, header: dict, arrays: dict) -> tuple[dict, dict]:
        import torch

        started = time.monotonic()
        tensors = {name: torch.from_numpy(value.copy()) for name, value in arrays.items()}
        correction = {name[len(CORRECTION_PREFIX):]: t for name, t in tensors.items()
                      if name.startswith(CORRECTION_PREFIX)}
        request = RoundRequest(int(header["run_id"]), int(header["node_id"]), int(header["round"]),
                               str(header["config_json"]),
                               {name: t for name, t in tensors.items() if not name.startswith(CORRECTION_PREFIX)},
                               float(header.get("proximal_mu", 0.0)), correction or None)
        outcome = run_round(request, self.node_config, self.states.setdefault(request.run_id, {}))
        self.rounds += 1
        log.info("worker: round %d of run %d %s in %.1f s (base loads in this worker: %d, rounds: %d)",
                 request.round_index, request.run_id, "done" if outcome.ok else "not trained",
                 time.monotonic() - started, base_loads(), self.rounds)
        if not outcome.ok:
            return {"error_code": outcome.error_code, "reason": outcome.reason}, {}
        reply = {name: tensor.detach().cpu().numpy() for name, tensor in outcome.arrays.items()}
        return {"error_code": 0, "metrics": outcome.metrics}, reply


def serve(path: Path, node_config: Mapping, *, ready: Callable[[str], None] = print) -> None:
    """Listen on ``path`` until SIGTERM or SIGINT; each connection is one round."""
    from fedft.federated.admission import NodeSettings, node_policy

    node_policy(NodeSettings.from_node_config(node_config))  # a bad policy or node config fails now, not per round
    log.propagate = False  # one line per event: importing flwr gave the root logger a handler too
    from fedft.model import load

    load.MAX_CACHED = 1  # a job with another model, rank or seed frees the previous job's base
    server = bind_socket(path)
    worker = Worker(node_config)
    stopping = False

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stopping
        stopping = True
        server.close()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    ready(f"fedft worker: listening on {path} (this user only); rounds run with this institution's node config")
    try:
        while not stopping:
            try:
                conn, _ = server.accept()
            except OSError:
                if stopping:
                    break
                raise
            with conn:
                if _peer_uid(conn) not in (None, os.getuid()):
                    log.warning("worker: refused a connection from another user")
                    continue
                try:
                    conn.settimeout(REQUEST_TIMEOUT_S)  # a peer that connects and sends nothing blocks no round
                    header, arrays = read_frame(conn)
                    conn.settimeout(None)
                    if _peer_gone(conn):  # Flower's round timeout killed the ClientApp: do not train for no one
                        log.warning("worker: round %s dropped: the ClientApp that sent it is gone", header.get("round"))
                        continue
                    write_frame(conn, *worker.handle(header, arrays))
                except Exception as error:  # noqa: BLE001 - one bad request must not stop the worker
                    log.warning("worker: a malformed or broken request was dropped (%s)", type(error).__name__)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
        Path(path).unlink(missing_ok=True)
        ready(f"fedft worker: stopped after {worker.rounds} rounds")
