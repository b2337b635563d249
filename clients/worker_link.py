"""The local channel between a ClientApp and its institution's resident worker: framed messages
over a Unix socket.

A message is a JSON header and a safetensors payload (the adapter tensors, as numpy arrays),
each preceded by its length: no pickle, so neither side runs code the other sent. This module
imports only the standard library, numpy and safetensors: the ClientApp that forwards a round
stays light (no torch, no transformers). ``ask_worker`` is the ClientApp's side;
``read_frame`` / ``write_frame`` serve both.
"""

from __future__ import annotations

import json
import socket
import struct

LENGTH = struct.Struct(">Q")
MAX_HEADER = 16 * 2**20  # a config is a few kB; anything larger is not a fedft frame
CONNECT_TIMEOUT_S = 10.0
CORRECTION_PREFIX = "correction/"  # SCAFFOLD's correction tensors, beside the adapter's in one payload


class WorkerUnavailable(ConnectionError):
    """The worker's socket does not exist, refused the connection, or closed it mid-round."""


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 2**20))
        if not chunk:
            raise WorkerUnavailable("the connection closed before the whole message arrived")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_frame(sock: socket.socket, header: dict, arrays: dict) -> None:
    """Send ``header`` (JSON) and ``arrays`` (name -> numpy array, as safetensors)."""
    from safetensors.numpy import save

    head = json.dumps(header).encode()
    payload = save(arrays) if arrays else b""
    sock.sendall(LENGTH.pack(len(head)) + head + LENGTH.pack(len(payload)))
    sock.sendall(payload)


def read_frame(sock: socket.socket) -> tuple[dict, dict]:
    """Receive one (header, arrays) message written by ``write_frame``."""
    from safetensors.numpy import load

    (size,) = LENGTH.unpack(_read_exactly(sock, LENGTH.size))
    if size > MAX_HEADER:
        raise WorkerUnavailable(f"a message header of {size} bytes is not a fedft frame")
    header = json.loads(_read_exactly(sock, size))
    (size,) = LENGTH.unpack(_read_exactly(sock, LENGTH.size))
    arrays = load(_read_exactly(sock, size)) if size else {}
    return header, arrays


def ask_worker(path: str, header: dict, arrays: dict) -> tuple[dict, dict]:
    """Send one round to the worker listening on ``path`` and wait for its answer (no time limit:
    the round takes what training takes; Flower's own round timeout still applies)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(path)
        except OSError as error:
            raise WorkerUnavailable(f"no resident worker answers on {path} ({error.strerror or error})") from None
        sock.settimeout(None)
        write_frame(sock, header, arrays)
        return read_frame(sock)
    except WorkerUnavailable:
        raise
    except OSError as error:
        raise WorkerUnavailable(f"the resident worker on {path} failed mid-round ({error})") from None
    finally:
        sock.close()
