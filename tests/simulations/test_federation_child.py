"""The federation's process starts before the run's checks: a refused run stops it and all it started."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedft.config import load_config
from fedft.data.files import DataError
from simulations.federation_process import (
    TOKEN_VAR,
    FederationChild,
    processes_with_token,
    run_federation_in_child,
)
from simulations.runner import simulate


def _wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def processes_in_group(pgid: int) -> list[int]:
    """Pids of the live processes whose process group is ``pgid`` (Linux /proc; zombies left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def test_a_cancelled_child_leaves_no_process_and_no_file(tiny_config_path, tmp_path):
    cfg = load_config(tiny_config_path)
    out = tmp_path / "run"
    child = FederationChild(cfg, out, resume=False, verbose=False)
    scratch = child.result.parent
    # wait until it has started Ray (its helpers carry the run's token), so cancelling has something to stop
    assert _wait_for(lambda: len(processes_with_token(child.token)) > 1)
    child.cancel()
    assert child.process.returncode is not None
    assert processes_with_token(child.token) == []
    assert _wait_for(lambda: processes_in_group(child.process.pid) == [], 10)  # SIGKILLed: gone within moments
    assert not scratch.exists() and not out.exists()


def _command_line(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_run_refused_by_its_checks_stops_the_early_started_federation(tiny_config_path, tmp_path, monkeypatch):
    """Refused once the child's engine runs: its client actor exists and its ServerApp waits for the go."""
    import simulations.runner as runner

    train = tiny_config_path.parent / "train.jsonl"
    train.write_text(train.read_text() + "{not json\n")
    token = f"refused-{time.monotonic_ns()}"
    monkeypatch.setenv(TOKEN_VAR, token)  # the run's token then starts with it
    seen: dict[str, int] = {}
    checks = runner._check_run

    def checks_once_the_actor_runs(*args, **kwargs):
        def actor_started() -> bool:
            for pid in processes_with_token(token, prefix=True):
                line = _command_line(pid)
                if b"federation_process" in line:
                    seen["child"] = pid
                if line.startswith(b"ray::ClientAppActor"):
                    seen["actor"] = pid
            return "actor" in seen and "child" in seen

        assert _wait_for(actor_started, 120)
        return checks(*args, **kwargs)

    monkeypatch.setattr(runner, "_check_run", checks_once_the_actor_runs)
    out = tmp_path / "run"
    with pytest.raises(DataError, match="train.jsonl"):
        simulate(load_config(tiny_config_path), out)
    assert _wait_for(lambda: processes_with_token(token, prefix=True) == [], 10)
    assert _wait_for(lambda: processes_in_group(seen["child"]) == [], 10)  # Ray's agents included
    assert not out.exists()


def test_a_finished_run_leaves_no_process_behind(tiny_config_path, tmp_path):
    """After a finished run nothing of it is left, Ray's agents included (they stay in the child's
    process group but do not carry the run's token), whether or not the child stopped Ray."""
    cfg = load_config(tiny_config_path)
    out = tmp_path / "run"
    with FederationChild(cfg, out, resume=False, verbose=False) as child:
        summary = run_federation_in_child(child)
        assert child.process.returncode == 0
        assert summary["rounds"] == cfg.strategy.num_rounds
        assert (out / "summary.json").is_file() and (out / "adapter").is_dir()
        assert _wait_for(lambda: processes_with_token(child.token) == [], 10)  # SIGKILLed: gone within moments
        assert _wait_for(lambda: processes_in_group(child.process.pid) == [], 10)
