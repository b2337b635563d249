"""Claiming a run directory: one run at a time, no silent replacement, refusals that change nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fedft.run.directory import LOCK_FILE, claimed_run_dir, lock_holder
from fedft.run.status import run_status
from fedft.rundir import RunDirError
from tests.conftest import REPO_ROOT


def snapshot(directory):
    """Every file under ``directory`` with its bytes and mtime."""
    return {p.relative_to(directory): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def finished_run(out):
    (out / "checkpoints" / "round-002").mkdir(parents=True)
    (out / "checkpoints" / "round-002" / "round.json").write_text('{"round": 2}')
    (out / "summary.json").write_text('{"rounds": 2}')
    return snapshot(out)


def test_a_finished_run_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "run"
    before = finished_run(out)
    with pytest.raises(RunDirError, match=r"already holds a run \(checkpoints, summary.json\); --resume continues "
                                          r"it, --overwrite replaces it"):
        with claimed_run_dir(out):
            pytest.fail("a refused claim ran")
    assert snapshot(out) == before and not (out / LOCK_FILE).exists()


def test_overwrite_replaces_the_old_run_whole(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    with claimed_run_dir(out, overwrite=True) as claimed:
        assert sorted(p.name for p in claimed.iterdir()) == [LOCK_FILE]  # no stale round-002 beside the new run
        (claimed / "checkpoints").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old run is gone, not parked


def test_a_file_or_contradictory_flags_are_refused(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        with claimed_run_dir(path):
            pass
    with pytest.raises(RunDirError, match="contradict"):
        with claimed_run_dir(tmp_path / "new", resume=True, overwrite=True):
            pass


HOLD = ("import sys, time\nfrom fedft.run.directory import claimed_run_dir\n"
        "with claimed_run_dir(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")


def test_a_second_run_on_the_same_directory_is_refused_at_once(tmp_path, tiny_config_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(out) == f"pid {holder.pid} on {os.uname().nodename}"
        assert run_status(out).code == 3 and run_status(out).text.startswith(f"running (pid {holder.pid}")
        with pytest.raises(RunDirError, match=f"in use by another fedft run \\(pid {holder.pid} on "):
            with claimed_run_dir(out, resume=True):
                pass
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--config", str(tiny_config_path),
                               "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"is in use by another fedft run (pid {holder.pid}" in done.stderr
        assert time.monotonic() - started < 60  # refused before any model is loaded
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(out) is None  # a killed run leaves no lock behind
    with claimed_run_dir(out, resume=True):
        pass


def test_the_command_refuses_a_finished_run_in_one_line(tmp_path, tiny_config_path):
    out = tmp_path / "run"
    before = finished_run(out)
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--config", str(tiny_config_path),
                           "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"fedft: error: --out {out} already holds a run")
    assert snapshot(out) == before
    assert json.loads((out / "summary.json").read_text()) == {"rounds": 2}


def test_a_run_finished_between_the_check_and_the_lock_is_not_run_over(tmp_path, monkeypatch):
    from fedft.run import directory

    out, real_lock = tmp_path / "run", directory._lock

    def another_run_finishes_first(path):
        (path / "summary.json").write_text('{"rounds": 2}')
        return real_lock(path)

    monkeypatch.setattr(directory, "_lock", another_run_finishes_first)
    with pytest.raises(RunDirError, match="written by another fedft run a moment ago"):
        with claimed_run_dir(out):
            pytest.fail("the run went ahead over the other's files")
    assert (out / "summary.json").read_text() == '{"rounds": 2}' and lock_holder(out) is None


@pytest.mark.slow
def test_two_simulations_started_together_on_one_out_leave_one_whole_run(tmp_path, tiny_config_path):
    """Two real ``fedft simulate`` processes at once: one runs, the other is refused before it writes."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(tiny_config_path), "--out",
               str(out), "--set", "strategy.num_rounds=1", "--set", "strategy.eval_every=0"]
    runs = [subprocess.Popen([*command, "--set", f"seed={seed}"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    refused = results[1 - winner][2]
    assert "Traceback" not in refused and len(refused.strip().splitlines()) == 1, refused
    assert any(reason in refused for reason in ("in use by another fedft run", "claimed by another fedft run",
                                                "written by another fedft run")), refused
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seed"] == winner + 1  # every file is the winner's
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
