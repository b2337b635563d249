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
    """Pids whose process group is ``pgid`` (Linux /proc; zombies not yet reaped count too)."""
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


def test_a_run_refused_by_its_checks_stops_the_early_started_federation(tiny_config_path, tmp_path, monkeypatch):
    train = tiny_config_path.parent / "train.jsonl"
    train.write_text(train.read_text() + "{not json\n")
    token = f"refused-{time.monotonic_ns()}"
    monkeypatch.setenv(TOKEN_VAR, token)  # the run's token then starts with it
    out = tmp_path / "run"
    with pytest.raises(DataError, match="train.jsonl"):
        simulate(load_config(tiny_config_path), out)
    assert processes_with_token(token, prefix=True) == []
    assert not out.exists()


def test_a_finished_run_leaves_no_process_behind(tiny_config_path, tmp_path):
    """The child leaves as soon as the run's files are written, without stopping Ray; the parent then
    kills what is left, Ray's agents included (they stay in the child's process group but do not
    carry the run's token)."""
    cfg = load_config(tiny_config_path)
    out = tmp_path / "run"
    with FederationChild(cfg, out, resume=False, verbose=False) as child:
        summary = run_federation_in_child(child)
        assert summary["rounds"] == cfg.strategy.num_rounds
        assert (out / "summary.json").is_file() and (out / "adapter").is_dir()
        assert _wait_for(lambda: processes_with_token(child.token) == [], 10)  # SIGKILLed: gone within moments
        assert _wait_for(lambda: processes_in_group(child.process.pid) == [], 10)
