"""Flower's Deployment Engine on 127.0.0.1, as institutions run it: real processes, real TLS.

A ``flower-superlink`` with TLS (certificates from ``fedft certs``) and SuperNode
authentication; two institutions' ``flower-supernode`` processes, each registered with
``flwr supernode register`` and pointed at its own JSONL file through ``--node-config``; a
2-round job started with ``flwr run`` under record-level DP-SGD, one institution training in its
resident worker (``fedft node serve``: the base loaded once for the job) behind a SuperNode
started with ``fedft node supernode`` (shorter polls), the other with a
policy that declines the second round (the server records it; both audit trails agree with
the coordinator's ledger). In the same family: a SuperNode whose key was never
registered is refused, and one that does not have the CA certificate cannot connect.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedft.demo.tasks import make_demo_rows, write_jsonl
from fedft.deploy.certs import make_node_key
from tests.conftest import TINY_TOML, write_tiny_model
from tests.simulations.deployment import ROOT, Deployment, wait_exit

pytestmark = pytest.mark.slow

ROWS = {"inst-a": 24, "inst-b": 16}  # different sizes: the round's example count shows who trained


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    model = write_tiny_model(root / "tiny-llama")
    coordinator = root / "coordinator"
    write_jsonl([r for r in make_demo_rows(2, 4, 0.5, seed=1)], coordinator / "eval.jsonl")
    # the coordinator's config names no training data: each institution brings its own
    config = TINY_TOML.format(model=model).replace('train_files = ["train.jsonl"]\n', "")
    (coordinator / "deploy.toml").write_text(config)
    rows = make_demo_rows(2, 24, 0.9, seed=0)
    for index, (name, count) in enumerate(ROWS.items()):
        institution = root / name
        write_jsonl([r for r in rows if r["institution"] == f"inst{index}"][:count], institution / "train.jsonl")
        make_node_key(institution / "keys", "node")
    make_node_key(root / "stranger" / "keys", "node")  # never registered
    deploy = Deployment(root)
    try:
        deploy.start_superlink()
        for name in ROWS:
            done = deploy.flwr("supernode", "register", str(root / name / "keys" / "node.pub"), "coordinator")
            assert done.returncode == 0 and "registered" in done.stdout, done.stdout + done.stderr
        yield deploy
    finally:
        deploy.stop()


def test_an_unregistered_supernode_is_refused(deployment):
    stranger = deployment.root / "stranger"
    process, log = deployment.start_supernode("stranger", stranger / "keys" / "node", stranger / "train.jsonl",
                                              max_retries=1)
    text = wait_exit(process, log)
    assert process.returncode != 0
    assert "Failed to activate SuperNode" in text, text[-3000:]
    assert "No SuperNode found with the given public key" in deployment.superlink_log.read_text()


def test_a_supernode_without_the_ca_certificate_cannot_connect(deployment):
    institution = deployment.root / "inst-a"  # a registered key: TLS fails before authentication
    process, log = deployment.start_supernode("no-ca", institution / "keys" / "node", institution / "train.jsonl",
                                              with_ca=False, max_retries=1)
    text = wait_exit(process, log)
    assert process.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in text, text[-3000:]


def test_two_institutions_train_over_tls_under_their_own_policies(deployment):
    """Record-level DP-SGD, 2 rounds. inst-a applies the safe defaults; inst-b's policy accepts one
    round a day, so it trains round 1 and declines round 2. The server records the decline with
    the policy key; each institution's audit trail agrees with the coordinator's ledger."""
    policy = deployment.root / "inst-b" / "policy.toml"
    policy.write_text("[compute]\nmax_rounds_per_day = 1\n")
    inst_a = deployment.root / "inst-a"
    socket_path = inst_a / "run" / "worker.sock"  # inst-a trains in its resident worker
    deployment.start_worker("inst-a-worker", socket_path,
                            f"data-path='{inst_a / 'train.jsonl'}' device='cpu' state-dir='{inst_a / 'state'}'")
    deployment.start_supernode("inst-a", inst_a / "keys" / "node", None, node_config=f"worker='{socket_path}'",
                               poll_interval=0.25)  # through fedft node supernode
    inst_b = deployment.root / "inst-b"
    deployment.start_supernode("inst-b", inst_b / "keys" / "node", inst_b / "train.jsonl",
                               node_config=f"state-dir='{inst_b / 'state'}' policy='{policy}'")
    deployment.wait_online(len(ROWS))
    out = deployment.root / "coordinator" / "run"
    config = deployment.root / "coordinator" / "deploy.toml"
    overrides = ("strategy.num_rounds=2 strategy.min_train_nodes=1 train.local_steps=1 "
                 "privacy.record_level=true privacy.dp_sgd_noise_multiplier=1.0")
    done = deployment.flwr(
        "run", ".", "coordinator", "--stream", "--run-config",
        f"config='{config}' overrides='{overrides}' out-dir='{out}'", timeout=240)
    logs = "\n".join(f"--- {name}\n{(deployment.root / f'{name}.log').read_text()[-2000:]}" for name in ROWS)
    assert (out / "adapter" / "adapter_model.safetensors").is_file(), done.stdout[-3000:] + done.stderr[-3000:] + logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients"] == 2 and rows[1]["client_failures"] == [] and rows[1]["rejected_updates"] == []
    assert rows[1]["num_examples"] == sum(ROWS.values())  # each institution trained on its own file
    assert rows[2]["clients"] == 1 and rows[2]["num_examples"] == ROWS["inst-a"]
    declined, = rows[2]["client_failures"]
    assert "fedft-declined: compute.max_rounds_per_day: 1 rounds accepted in the last 24 hours" in declined
    ledger = [json.loads(line) for line in (out / "privacy_ledger.jsonl").read_text().splitlines()]
    node_b = declined.split(":")[0].removeprefix("node ")
    assert ledger[1]["refusals"] == [node_b]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["data"]["train_files"] == []
    run_files = " ".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.suffix in {".json", ".jsonl"})
    assert "inst-a" not in run_files and "inst-b" not in run_files  # no institution path reached the server
    decisions = {}
    for name in ROWS:
        state = deployment.root / name / "state"
        trail = [json.loads(line) for line in (state / "audit-trail.jsonl").read_text().splitlines()]
        decisions[name] = [(r["round"], r["decision"], r["policy_key"]) for r in trail]
        assert all(r["reply_sha256"] for r in trail if r["decision"] == "accepted")
        report = subprocess.run([sys.executable, "-m", "simulations.cli", "privacy", "report", "--node", str(state),
                                 str(out)], cwd=ROOT, capture_output=True, text=True)
        assert report.returncode == 0 and "no disagreement found" in report.stdout, report.stdout + report.stderr
    worker_log = (deployment.root / "inst-a-worker.log").read_text()
    assert "settings chosen by the coordinator: " in worker_log
    # the worker loaded the base once for both rounds; inst-a's SuperNode loaded nothing
    assert "round 2 of run" in worker_log and "base loads in this worker: 1, rounds: 2" in worker_log, worker_log
    node_a_log = (deployment.root / "inst-a.log").read_text()
    assert "Loading weights" not in node_a_log
    assert "polling every 0.25 s when idle" in node_a_log  # inst-a's SuperNode ran through the launcher
    assert "flwr-clientapp without Flower's SuperNode CLI imports" in node_a_log  # and its lighter flwr-clientapp
    assert decisions == {"inst-a": [(1, "accepted", ""), (2, "accepted", "")],
                         "inst-b": [(1, "accepted", ""), (2, "declined", "compute.max_rounds_per_day")]}
