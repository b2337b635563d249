"""The institution's audit trail: append-only rows, its epsilon recomputed, the coordinator's ledger checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedft.federated.audit_trail import (
    TRAIL_FILE,
    TrailError,
    TrailRecorder,
    node_report,
    read_trail,
    tensors_sha256,
)
from fedft.privacy.client_accountant import DpSgdRound, epsilon_of
from fedft.privacy.ledger import RECORD_LEVEL, LedgerRow, append_row

SPENT = [DpSgdRound(0.25, 1.1, 4), DpSgdRound(0.25, 1.1, 4)]
STATE = {"b": torch.ones(2, 3), "a": torch.zeros(3)}


def write_trail(state_dir, node_id: int = 7) -> None:
    """Run 5: round 1 and 2 trained with DP-SGD, round 3 declined."""
    history = []
    for round_index, spent in enumerate(SPENT, start=1):
        recorder = TrailRecorder(5, node_id, round_index, '{"seed": 0}')
        recorder.state_dir, recorder.history = state_dir, list(history)
        recorder.accepted({}, spent.steps, spent, STATE)
        history.append(spent)
    recorder = TrailRecorder(5, node_id, 3, '{"seed": 0}')
    recorder.state_dir, recorder.history = state_dir, list(history)
    recorder.declined("privacy.max_epsilon: one more round would pass the limit")


def ledger_rows(node: str = "7", noise: float = 1.1, refusal: bool = True) -> list[LedgerRow]:
    rows = []
    for round_index, spent in enumerate(SPENT, start=1):
        rows.append(LedgerRow(
            round=round_index, mechanisms=[RECORD_LEVEL], sampled_clients=[node], participating_clients=[node],
            num_clients=1, sampling="none", sampling_rate=1.0, noise_multiplier=0.0, clip_norm=0.0, delta=1e-5,
            record_level={node: {"sample_rate": spent.sample_rate, "noise_multiplier": noise if round_index == 2
                                 else spent.noise_multiplier, "steps": spent.steps, "epsilon": None}}))
    rows.append(LedgerRow(round=3, mechanisms=[RECORD_LEVEL], sampled_clients=[node], participating_clients=[],
                          num_clients=1, sampling="none", sampling_rate=1.0, noise_multiplier=0.0, clip_norm=0.0,
                          delta=1e-5, refusals=[node] if refusal else []))
    return rows


def test_rows_record_the_spend_and_the_reply(tmp_path):
    write_trail(tmp_path)
    rows = read_trail(tmp_path)
    assert [(r.round, r.decision) for r in rows] == [(1, "accepted"), (2, "accepted"), (3, "declined")]
    assert rows[1].epsilon == pytest.approx(epsilon_of(SPENT, 1e-5))
    assert rows[2].epsilon == rows[1].epsilon and rows[2].policy_key == "privacy.max_epsilon"
    assert rows[0].reply_sha256 == tensors_sha256(STATE) and rows[0].bytes_sent == 36
    assert tensors_sha256({"a": torch.zeros(3), "b": torch.ones(2, 3)}) == tensors_sha256(STATE)
    assert tensors_sha256({**STATE, "a": torch.zeros(3, dtype=torch.float16)}) != tensors_sha256(STATE)


def test_the_report_recomputes_and_flags_an_edited_trail(tmp_path):
    write_trail(tmp_path)
    report = node_report(tmp_path)
    assert report["mismatches"] == [] and report["epsilon"] == pytest.approx(epsilon_of(SPENT, 1e-5))
    path = tmp_path / TRAIL_FILE
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    row["epsilon"] = row["epsilon"] / 2
    path.write_text("\n".join([lines[0], json.dumps(row), lines[2]]) + "\n")
    assert len(node_report(tmp_path)["mismatches"]) == 1
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(TrailError, match=f"{TRAIL_FILE}:2: not an audit trail row"):
        read_trail(tmp_path)


def test_the_coordinators_ledger_is_checked_round_by_round(tmp_path):
    write_trail(tmp_path)
    assert node_report(tmp_path, ledger_rows())["ledger_flags"] == []
    flags = node_report(tmp_path, ledger_rows(noise=3.0))["ledger_flags"]
    assert flags == ["round 2: the ledger records noise_multiplier = 3.0; this institution ran 1.1"]
    flags = node_report(tmp_path, ledger_rows(refusal=False))["ledger_flags"]
    assert flags == ["round 3: this institution declined (privacy.max_epsilon); the ledger does not record the refusal"]
    flags = node_report(tmp_path, ledger_rows()[1:])["ledger_flags"]
    assert flags[0].startswith("round 1: this institution ran DP-SGD and sent its update, but the coordinator's "
                               "ledger has no row")
    assert node_report(tmp_path, ledger_rows(node="8"))["ledger_flags"]  # charged to someone else


def test_the_command_exits_1_on_an_edited_ledger(tmp_path):
    state, run = tmp_path / "state", tmp_path / "run"
    write_trail(state)
    for rows, expected in ((ledger_rows(), 0), (ledger_rows(noise=3.0), 1)):
        ledger = run / "privacy_ledger.jsonl"
        ledger.unlink(missing_ok=True)
        for row in rows:
            append_row(ledger, row)
        done = subprocess.run([sys.executable, "-m", "simulations.cli", "privacy", "report", "--node", str(state),
                               str(run)], capture_output=True, text=True)
        assert done.returncode == expected, done.stdout + done.stderr
    assert "LEDGER round 2: the ledger records noise_multiplier = 3.0" in done.stdout
    assert "record-level epsilon" in done.stdout
