"""``fedft node supernode``: Flower's SuperNode with shorter poll waits (clients/supernode.py).

The launcher end to end (TLS, authentication, a 2-round job through the resident worker) is
in tests/simulations/test_deployment.py; here, the parts that decide what it does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from clients.supernode import (
    FLOWER_IDLE_WAIT_S,
    FLOWER_REPLY_WAIT_S,
    LauncherError,
    PollClock,
    check_flower_waits,
    check_poll_interval,
)
from tests.simulations.deployment import ROOT


class RecordingClock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def monotonic(self) -> float:
        return 42.0


def test_the_supernode_waits_become_the_poll_interval_and_nothing_else_changes():
    real = RecordingClock()
    clock = PollClock(0.25, real)
    for seconds in (FLOWER_IDLE_WAIT_S, FLOWER_REPLY_WAIT_S, 1, 0.1):
        clock.sleep(seconds)
    assert real.slept == [0.25, 0.25, 1, 0.1]
    assert clock.monotonic() == 42.0  # everything else goes to the real module


def test_a_poll_interval_above_the_reply_wait_leaves_that_wait_as_flower_has_it():
    real = RecordingClock()
    PollClock(1.0, real).sleep(FLOWER_REPLY_WAIT_S)
    PollClock(1.0, real).sleep(FLOWER_IDLE_WAIT_S)
    assert real.slept == [FLOWER_REPLY_WAIT_S, 1.0]


def test_the_installed_flower_waits_where_the_launcher_expects():
    """Fails when a Flower upgrade changes the SuperNode's loop: the launcher must then be revisited."""
    import flwr.supernode.start_client_internal as loop

    check_flower_waits(loop)


def test_a_flower_that_waits_differently_is_refused(tmp_path, monkeypatch):
    module_file = tmp_path / "other_loop.py"
    module_file.write_text("import time\n\ndef loop():\n    time.sleep(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import other_loop

    with pytest.raises(LauncherError, match=r"other_loop: no time\.sleep\(3\); no time\.sleep\(0\.5\)"):
        check_flower_waits(other_loop)
    with pytest.raises(LauncherError, match="start flower-supernode directly"):
        check_flower_waits(types.ModuleType("built_in_memory"))


@pytest.mark.parametrize("poll_s", [0.0, 0.01, 3.5, float("nan"), float("inf")])
def test_a_poll_interval_out_of_range_is_refused(poll_s):
    with pytest.raises(LauncherError, match="--poll-interval .*between 0.05 and 3.0 seconds"):
        check_poll_interval(poll_s)


@pytest.mark.parametrize("args, message", [
    (["--poll-interval", "0"], "--poll-interval 0.0: must be between 0.05 and 3.0 seconds"),
    (["--"], "no flower-supernode arguments after '--'"),
])
def test_the_command_refuses_before_starting_anything(args, message):
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "node", "supernode", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Starting Flower SuperNode" not in done.stdout + done.stderr


@pytest.mark.parametrize("preset, expected", [(None, "0"), ("1", "1")])
def test_the_launcher_turns_flower_telemetry_off_unless_the_institution_set_it(monkeypatch, preset, expected):
    import flwr.supernode.cli.flower_supernode  # noqa: F401 - loads the module named below
    import flwr.supernode.start_client_internal as loop

    from clients.supernode import SUPEREXEC_POLL_ENV, TELEMETRY_ENV, run_supernode

    for name in (TELEMETRY_ENV, SUPEREXEC_POLL_ENV):
        monkeypatch.delenv(name, raising=False)
    if preset is not None:
        monkeypatch.setenv(TELEMETRY_ENV, preset)
    cli = sys.modules["flwr.supernode.cli.flower_supernode"]  # the package's name for it is the function
    seen = {}
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(sys, "argv", sys.argv)
    monkeypatch.setenv("PATH", os.environ["PATH"])  # the launcher prepends its flwr-clientapp directory
    monkeypatch.setattr(cli, "flower_supernode", lambda: seen.update(argv=sys.argv, telemetry=os.environ[TELEMETRY_ENV],
                                                                      poll=os.environ[SUPEREXEC_POLL_ENV]))
    run_supernode(["--superlink", "127.0.0.1:1"], poll_s=0.5)
    assert seen == {"argv": ["flower-supernode", "--superlink", "127.0.0.1:1"], "telemetry": expected, "poll": "0.5"}
    assert isinstance(loop.time, PollClock)
