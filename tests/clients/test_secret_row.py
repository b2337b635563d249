"""A row carrying a secret fails its institution's rounds, and nothing of it reaches the coordinator.

fedft's real server loop (``server.federation.run_federation``: metrics, checkpoints, summary,
report) drives two institutions' real ClientApps in this process. Institution B's file has
one malformed row holding a name and an SSN; every file the coordinator writes, and every
line it prints, is searched for the secret and for B's paths. B's own log and audit trail
keep what happened.
"""

from __future__ import annotations

import logging

from fedft.config import load_config
from fedft.federated import wire
from fedft.federated.audit_trail import read_trail
from server.federation import run_federation
from tests.clients.inprocess import InProcessGrid, institution, two_institutions

SECRET = "SECRET-Jane Roe, SSN 078-05-1120"


def test_a_secret_in_a_bad_row_stays_at_the_institution(tiny_model_dir, tmp_path, task_identity, caplog):
    config, sites = two_institutions(tmp_path, tiny_model_dir, names=("hospital-a", "hospital-b-private"))
    cfg = load_config(config, ["strategy.min_train_nodes=1", "train.local_steps=1"])
    good, bad = sites[11], sites[12]
    with (bad / "train.jsonl").open("a") as handle:
        handle.write('{"prompt": "Patient: ' + SECRET + '", "answer": \n')  # malformed: no value
    grid = InProcessGrid({
        11: institution({"data-path": str(good / "train.jsonl"), "state-dir": str(good / "state")}, node_id=11),
        12: institution({"data-path": str(bad / "train.jsonl"), "state-dir": str(bad / "state")}, node_id=12),
    })
    printed: list[str] = []
    out = config.parent / "run"
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
