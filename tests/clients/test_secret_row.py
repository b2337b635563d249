"""A row carrying a secret fails its institution's rounds, and nothing of it reaches the coordinator.

fedft's real server loop (``server.federation.run_federation``: metrics, checkpoints, summary,
report) drives two institutions' real ClientApps in this process. Institution B's file has
one malformed row holding a name and an SSN; every file the coordinator writes, and every
line it prints, is searched for the secret and for B's paths. B's own log and audit trail
keep what happened.
"""

from __future__ import annotations

import logging

import pytest

from fedft.config import load_config
from fedft.demo.tasks import make_demo_rows, write_jsonl
from fedft.federated import wire
from fedft.federated.audit_trail import read_trail
from server.federation import run_federation
from tests.clients.inprocess import InProcessGrid, institution
from tests.conftest import TINY_TOML

SECRET = "SECRET-Jane Roe, SSN 078-05-1120"


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower sets in a ServerApp process before it builds messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_a_secret_in_a_bad_row_stays_at_the_institution(tiny_model_dir, tmp_path, task_identity, caplog):
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    write_jsonl(make_demo_rows(2, 4, 0.5, seed=1), coordinator / "eval.jsonl")
    toml = TINY_TOML.format(model=tiny_model_dir).replace('train_files = ["train.jsonl"]\n', "")
    (coordinator / "deploy.toml").write_text(toml)
    cfg = load_config(coordinator / "deploy.toml", ["strategy.min_train_nodes=1", "train.local_steps=1"])
    rows = make_demo_rows(2, 24, 0.9, seed=0)
    good, bad = tmp_path / "hospital-a", tmp_path / "hospital-b-private"
    write_jsonl([r for r in rows if r["institution"] == "inst0"][:12], good / "train.jsonl")
    write_jsonl([r for r in rows if r["institution"] == "inst1"][:12], bad / "train.jsonl")
    with (bad / "train.jsonl").open("a") as handle:
        handle.write('{"prompt": "Patient: ' + SECRET + '", "answer": \n')  # malformed: no value
    grid = InProcessGrid({
        11: institution({"data-path": str(good / "train.jsonl"), "state-dir": str(good / "state")}, node_id=11),
        12: institution({"data-path": str(bad / "train.jsonl"), "state-dir": str(bad / "state")}, node_id=12),
    })
    printed: list[str] = []
    out = coordinator / "run"
    with caplog.at_level(logging.ERROR, logger="fedft.client"):
        run_federation(grid, cfg, out, progress=printed.append)

    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3  # rounds 0, 1, 2: the run went on with institution A
    assert f"node 12: {wire.FAILED}: DataError: its training data could not be read" in metrics[1]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" for p in written) and any("checkpoints" in p.parts for p in written)
    forbidden = ["SECRET", "Jane Roe", "078-05-1120", str(bad), bad.name]
    for path in written:
        data = path.read_bytes()
        for word in forbidden:
            assert word.encode() not in data, f"{word!r} reached the coordinator's {path.relative_to(out)}"
    for word in forbidden:
        assert not any(word in line for line in printed), f"{word!r} was printed by the coordinator"
    # The institution keeps the full story: its own log names the file and line, its trail the failures.
    where = f"{bad / 'train.jsonl'}:13: not valid JSON"
    assert any(where in (record.exc_text or "") for record in caplog.records if record.name == "fedft.client")
    trail = read_trail(bad / "state")
    assert [(r.round, r.decision) for r in trail] == [(1, "failed"), (2, "failed")]
    assert trail[0].reason.startswith(f"{wire.FAILED}: DataError")
    assert [r.decision for r in read_trail(good / "state")] == ["accepted", "accepted"]
