"""``fedft status RUN_DIR``: whether a run is running, finished, stopped early, failed or was cut short.

For scripts and for deployments, where ``flwr run --stream`` exits 0 whatever the ServerApp
did: the run directory itself says how the run ended. Exit status: 0 finished (or stopped
early on purpose, e.g. every client declined), 1 failed or incomplete, 3 still running.
Reads files only (no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedft.run.directory import lock_holder
from fedft.rundir import CHECKPOINT_META, FAILURE_FILE, SUMMARY_FILE, RunDirError, latest_checkpoint

FINISHED, FAILED, RUNNING = 0, 1, 3


@dataclass(frozen=True)
class RunStatus:
    code: int  # FINISHED, FAILED or RUNNING
    text: str


def last_complete_round(run_dir: Path) -> int:
    """The round of the newest complete checkpoint (0 when there is none)."""
    latest = latest_checkpoint(run_dir)
    return int(json.loads((latest / CHECKPOINT_META).read_text())["round"]) if latest else 0


def run_status(run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a run directory")
    last = last_complete_round(run_dir)
    holder = lock_holder(run_dir)
    if holder:
        return RunStatus(RUNNING, f"running ({holder}); last complete round {last}")
    resume = "continue it with `fedft simulate ... --resume` (or `flwr run` with resume=true)"
    failure = run_dir / FAILURE_FILE
    if failure.is_file():
        data = json.loads(failure.read_text())
        return RunStatus(FAILED, f"failed: {data['error']}: {data['message']}; last complete round {last}; {resume}")
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        return RunStatus(FAILED, f"incomplete: no {SUMMARY_FILE} and no recorded error (killed?); last complete "
                                 f"round {last}; {resume}")
    summary = json.loads(summary_path.read_text())
    final = summary.get("final", {}).get("eval_exact_match")
    text = f"finished: {summary.get('rounds')} rounds" + (f", exact match {100 * final:.1f}%" if final is not None
                                                          else "")
    stopped = summary.get("stopped")
    if stopped:
        text += f"; stopped before round {stopped['round']}: {stopped['reason']}"
    return RunStatus(FINISHED, text)
