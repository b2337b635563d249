"""Stop a DP run with SIGTERM, resume it, kill it outright, resume it: every round once in the ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedft.privacy.bookkeeping import LEDGER_FILE
from fedft.privacy.ledger import audit, read_ledger
from fedft.rundir import load_metrics
from tests.conftest import REPO_ROOT, write_tiny_setup

pytestmark = pytest.mark.slow

ROOT = REPO_ROOT
OVERRIDES = ["strategy.num_rounds=4", "strategy.eval_every=0", "strategy.aggregation=ffa",
             "strategy.server_optimizer=fedadam", "strategy.server_lr=0.01",
             "privacy.user_level=true", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.05",
             "privacy.record_level=true", "privacy.noise_seed=11"]


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    return [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config), "--out", str(out),
            *sets, *extra]


def _wait_for_round(proc: subprocess.Popen, out: Path, round_index: int) -> None:
    deadline = time.time() + 240
    while not (out / "checkpoints" / f"round-{round_index:03d}" / "round.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"round {round_index} never finished"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def resumed_dp_run(tiny_model_dir, tmp_path_factory):
    """A 4-round DP run stopped by SIGTERM after round 1, resumed and SIGKILLed (server and Ray
    workers) after round 3, then resumed to the end. Returns its config, its directory, what the
    SIGTERM left (exit code, stderr, processes of the run still alive, ``fedft status``), the number
    of ledger rows at the SIGKILL and the last command's result."""
    from fedft.run.status import run_status
    from simulations.federation_process import TOKEN_VAR, processes_with_token

    root = tmp_path_factory.mktemp("resume")
    config, out = write_tiny_setup(root, tiny_model_dir), root / "run"
    token = f"test-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(_command(config, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, TOKEN_VAR: token})
    _wait_for_round(proc, out, 1)
    assert processes_with_token(token, prefix=True)  # the federation runs in processes that carry the token
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=90)
    stopped = {"code": proc.returncode, "stderr": stderr, "left": processes_with_token(token, prefix=True),
               "status": run_status(out), "summary": (out / "summary.json").exists()}

    proc = subprocess.Popen(_command(config, out, "--resume"), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_round(proc, out, 3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its Ray workers, mid-run
        proc.wait()
    assert not (out / "summary.json").exists()
    killed_at = len(read_ledger(out / LEDGER_FILE))
    done = subprocess.run(_command(config, out, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    return config, out, stopped, killed_at, done


def test_sigterm_stops_a_run_cleanly(resumed_dp_run):
    """SIGTERM (as a scheduler or `kill` sends it): exit 143 with a clear line, every complete round kept,
    no process of the run left, `fedft status` says so."""
    stopped = resumed_dp_run[2]
    assert stopped["code"] == 143, stopped["stderr"][-3000:]
    assert "interrupted; the run directory keeps every complete round" in stopped["stderr"]
    assert "Traceback" not in stopped["stderr"]
    assert "did not stop within" not in stopped["stderr"]  # it stopped by itself, not killed after the grace period
    assert stopped["left"] == []
    assert stopped["status"].code == 1 and "Interrupted: stopped by SIGTERM" in stopped["status"].text
    assert not stopped["summary"]


def test_a_killed_dp_run_resumes_with_each_round_once_in_the_ledger(resumed_dp_run):
    from fedft.run.status import run_status

    _, out, _, killed_at, done = resumed_dp_run
    assert killed_at in (2, 3)  # round 3's ledger row follows its checkpoint; the kill may fall between
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming after round" in done.stdout
    rows = read_ledger(out / LEDGER_FILE)
    assert [r.round for r in rows] == [1, 2, 3, 4]
    assert audit(rows) == []
    assert [r["round"] for r in load_metrics(out)] == [0, 1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["privacy"]["rounds_accounted"] == 4
    # each simulated client's own DP-SGD spend survived both restarts
    spent = [json.loads(p.read_text()) for p in sorted((out / "client-privacy").glob("*.json"))]
    assert len(spent) == 2 and all(len(s["steps"]) >= 4 for s in spent)
    assert run_status(out).code == 0 and not (out / "failed.json").exists()


def test_resume_refuses_a_different_config(resumed_dp_run):
    config, out, _, _, done = resumed_dp_run
    assert done.returncode == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = subprocess.run(_command(config, out, "--set", "privacy.clip_norm=0.1", "--resume"),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert "the config differs: privacy.clip_norm" in again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    # the refusal changed nothing: summary.json (which export, report and compare read) is still there
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_failed_federation_exits_non_zero_with_its_reason(tiny_config_path, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--config", str(tiny_config_path),
                           "--out", str(out), "--set", "strategy.max_update_norm=1e-9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedft: run failed: round 1: 0 of 2 clients replied"), done.stderr[-2000:]
    assert "update norm" in last
    assert not (out / "summary.json").exists() and (out / "metrics.jsonl").exists()
    status = subprocess.run([sys.executable, "-m", "simulations.cli", "status", str(out)], cwd=ROOT,
                            capture_output=True, text=True)
    assert status.returncode == 1 and "failed: FederationError: round 1: 0 of 2 clients replied" in status.stdout


def test_a_field_the_checkpoint_predates_counts_as_its_default():
    """A newer fedft adds fields; a checkpoint written before them still resumes, a real change does not."""
    from fedft.config import FedftConfig, config_to_dict
    from fedft.run.resume import _config_differences

    defaults = config_to_dict(FedftConfig())
    current = config_to_dict(FedftConfig())
    saved = json.loads(json.dumps(current))
    del saved["data"]["columns"], saved["model"]["allow_unquantized"]
    assert _config_differences(saved, current, defaults) == []
    saved["train"]["learning_rate"] = 0.5
    assert _config_differences(saved, current, defaults) == [
        f"train.learning_rate: checkpoint 0.5, now {current['train']['learning_rate']!r}"]
