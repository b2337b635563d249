"""``fedft node supernode``: Flower's own SuperNode, with shorter waits between its polls.

In flwr 1.41 and 1.42 a SuperNode with no message waiting sleeps 3 s before it asks the
SuperLink again (``flwr/supernode/start_client_internal.py``), looks for the ClientApp's reply
every 0.5 s, and its SuperExec looks for a ClientApp to start every 1 s. The next round's
train message arrives a fraction of a second after a reply (the server only aggregates), so
with the resident worker (``fedft node serve``) the 3 s sleep is the largest part of what a
deployed round costs beyond its training (docs/benchmark.md).

This launcher runs the same SuperNode (Flower's ``flower_supernode``, with the institution's
own arguments: TLS, authentication, node config untouched) in this process, after setting
those three waits to ``poll_s``. It changes when the SuperNode asks, nothing of what it asks
or accepts. The cost: an idle SuperNode asks the SuperLink 1 / ``poll_s`` times a second
instead of once every 3 s. The coordinator cannot set or see the interval; the institution
chooses it on its own command line.

The waits are replaced by name in Flower's module, so the launcher first checks that the
installed Flower still waits where and how it expects (``check_flower_waits``) and refuses to
start otherwise; ``flower-supernode`` itself then still works.

It also turns Flower's usage telemetry off for the SuperNode and every process it starts
(``FLWR_TELEMETRY_ENABLED=0``, unless the institution set the variable itself): by default
each Flower process posts start and stop events to Flower's server, and nothing but the
adapter and the allowed metrics should leave an institution unasked.

Every message starts a fresh ``flwr-clientapp`` process; the launcher puts a lighter command
of that name first on the SuperExec's ``PATH``: Flower's own ``flwr_clientapp()`` without the
SuperNode CLI imports around it, 0.35 s less per message (clients/clientapp_command.py).
"""

from __future__ import annotations

import atexit
import inspect
import math
import os
import shutil
import sys
import tempfile
import time
import types
from importlib.metadata import version
from pathlib import Path

from clients.clientapp_command import (
    CommandUnavailable,
    check_command,
    load_flower_clientapp,
    prepend_to_path,
    write_command,
)

FLOWER_IDLE_WAIT_S = 3  # the SuperNode's sleep when the SuperLink had no message for it
FLOWER_REPLY_WAIT_S = 0.5  # its sleep between looks for the ClientApp's reply
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # read by flower-superexec, default 1 s
TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"  # Flower's usage events to telemetry.flower.ai; "0" turns them off
MIN_POLL_S, MAX_POLL_S = 0.05, 3.0
DEFAULT_POLL_S = 0.25


class LauncherError(Exception):
    """The launcher cannot start the SuperNode as asked; nothing was started."""


class PollClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its fixed 3 s and 0.5 s
    waits become at most ``poll_s``; every other call goes to ``real``."""

    def __init__(self, poll_s: float, real: object = time) -> None:
        self.poll_s = poll_s
        self._real = real

    def sleep(self, seconds: float) -> None:
        if seconds in (FLOWER_IDLE_WAIT_S, FLOWER_REPLY_WAIT_S):
            seconds = min(seconds, self.poll_s)
        self._real.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def check_poll_interval(poll_s: float) -> None:
    if not (math.isfinite(poll_s) and MIN_POLL_S <= poll_s <= MAX_POLL_S):
        raise LauncherError(f"--poll-interval {poll_s}: must be between {MIN_POLL_S} and {MAX_POLL_S} seconds")


def check_flower_waits(module: types.ModuleType) -> None:
    """Refuse unless ``module`` imports ``time`` and waits with ``time.sleep(3)`` and ``time.sleep(0.5)``."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = ""
    expected = [f"time.sleep({FLOWER_IDLE_WAIT_S})", f"time.sleep({FLOWER_REPLY_WAIT_S})"]
    missing = [text for text in expected if text not in source]
    if missing or getattr(module, "time", None) is not time:
        found = "; ".join(f"no {text}" for text in missing) or "its 'time' is not the time module"
        raise LauncherError(f"the installed flwr {version('flwr')} does not wait as fedft node supernode expects "
                            f"({module.__name__}: {found}); start flower-supernode directly")


def install_lean_clientapp_command() -> str:
    """Put fedft's ``flwr-clientapp`` (clients/clientapp_command.py) first on the ``PATH`` the
    SuperExec inherits, in a private directory removed at exit; say which command will run."""
    try:
        load_flower_clientapp()
        directory = Path(tempfile.mkdtemp(prefix="fedft-clientapp-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        check_command(write_command(directory))
    except CommandUnavailable as reason:
        return f"flwr-clientapp as Flower installs it ({reason})"
    prepend_to_path(directory)
    return "flwr-clientapp without Flower's SuperNode CLI imports"


def run_supernode(flower_args: list[str], poll_s: float = DEFAULT_POLL_S) -> None:
    """Run ``flower-supernode FLOWER_ARGS`` in this process with every poll wait at most ``poll_s``."""
    check_poll_interval(poll_s)
    if not flower_args:
        raise LauncherError("no flower-supernode arguments after '--' (at least --superlink HOST:PORT)")
    os.environ.setdefault(TELEMETRY_ENV, "0")  # before flwr is imported: Flower reads it once, at import
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    check_flower_waits(loop)
    loop.time = PollClock(poll_s)
    os.environ.setdefault(SUPEREXEC_POLL_ENV, str(poll_s))  # inherited by the SuperExec it starts
    clientapp = install_lean_clientapp_command()
    print(f"fedft: flower-supernode (flwr {version('flwr')}) polling every {poll_s} s when idle "
          f"(Flower's own: {FLOWER_IDLE_WAIT_S} s); "
          f"Flower telemetry {'off' if os.environ[TELEMETRY_ENV] == '0' else 'on'}; {clientapp}", flush=True)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
