"""Faults injected into a real deployment on 127.0.0.1: processes killed mid-run.

One SuperLink (TLS, SuperNode authentication, its state in a SQLite file so that registrations
survive a restart) and two institutions, each a ``flower-supernode`` beside its resident
worker (``fedft node serve``). Jobs are started with ``flwr run`` as a coordinator would:

- the SuperLink is SIGKILLed after round 2's checkpoint (Flower's ServerApp process, detached
  from it, notices and exits, which releases the run directory), started again on the same
  database, and the job is started again with ``resume=true``: the final adapter equals, bit for bit, that of the same job run without
  interruption, and the privacy ledger holds each round once;
- an institution's SuperNode is SIGKILLed mid-run: with ``strategy.min_train_nodes = 2`` the
  run fails and ``fedft status`` exits 1 naming the silent node by its node id; with
  ``min_train_nodes = 1`` the round goes on with the other institution and records the failure.
  (Flower refuses to activate a restarted SuperNode while it still counts the killed one as
  online, up to a minute: the test waits for that, as an institution's operator must.)

Deterministic because both jobs run on the same nodes (node ids, hence client seeds, are the
same), DP-SGD noise comes from a fixed seed the institutions' policies allow, and the mean of
two updates does not depend on the order in which they arrive.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedft.demo.tasks import make_demo_rows, write_jsonl
from fedft.deploy.certs import make_node_key
from tests.conftest import TINY_TOML, write_tiny_model
from tests.simulations.deployment import ROOT, Deployment, tool

pytestmark = pytest.mark.slow

SITES = ("inst-a", "inst-b")
JOB = ("train.local_steps=2 privacy.record_level=true privacy.dp_sgd_noise_multiplier=1.0 "
       "privacy.noise_seed=7 strategy.eval_every=0")  # no held-out scoring between rounds: faster


class Sites:
    """The deployment plus what the tests restart: an institution's SuperNode, the SuperLink."""

    def __init__(self, deploy: Deployment, root: Path):
        self.deploy, self.root = deploy, root
        self.database = root / "coordinator" / "superlink.db"
        self.config = root / "coordinator" / "deploy.toml"
        self.supernodes: dict[str, subprocess.Popen] = {}

    def start_supernode(self, name: str) -> None:
        site = self.root / name
        process, _ = self.deploy.start_supernode(name, site / "keys" / "node", None,
                                                 node_config=f"worker='{site / 'run' / 'worker.sock'}'")
        self.supernodes[name] = process

    def job(self, out: Path, overrides: str = "", **flags: str) -> list[str]:
        extra = "".join(f" {key}={value}" for key, value in flags.items())
        return [tool("flwr"), "run", ".", "coordinator", "--stream", "--run-config",
                f"config='{self.config}' overrides='{JOB} {overrides}' out-dir='{out}'{extra}"]

    def run_job(self, out: Path, overrides: str = "", **flags: str) -> subprocess.CompletedProcess:
        done = subprocess.run(self.job(out, overrides, **flags), cwd=ROOT, env=self.deploy.env,
                              capture_output=True, text=True, timeout=300)
        return done

    def start_job(self, out: Path, overrides: str = "") -> subprocess.Popen:
        return subprocess.Popen(self.job(out, overrides), cwd=ROOT, env=self.deploy.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.root.glob("*.log")))


def status(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", "status", str(out)], cwd=ROOT,
                          capture_output=True, text=True)


def wait_for(path: Path, sites: Sites, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout}s\n{sites.logs()}")
        time.sleep(0.2)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = write_tiny_model(root / "tiny-llama")
    coordinator = root / "coordinator"
    write_jsonl(make_demo_rows(2, 4, 0.5, seed=1), coordinator / "eval.jsonl")
    config = TINY_TOML.format(model=model).replace('train_files = ["train.jsonl"]\n', "").replace(
        "num_rounds = 2", "num_rounds = 3")
    (coordinator / "deploy.toml").write_text(config)
    train = make_demo_rows(2, 16, 0.9, seed=0)
    deploy = Deployment(root)
    found = Sites(deploy, root)
    try:
        deploy.start_superlink(database=found.database)
        for index, name in enumerate(SITES):
            site = root / name
            write_jsonl([r for r in train if r["institution"] == f"inst{index}"], site / "train.jsonl")
            (site / "policy.toml").write_text("[privacy]\nallow_fixed_noise_seed = true\n")
            make_node_key(site / "keys", "node")
            done = deploy.flwr("supernode", "register", str(site / "keys" / "node.pub"), "coordinator")
            assert done.returncode == 0, done.stdout + done.stderr
            deploy.start_worker(f"{name}-worker", site / "run" / "worker.sock",
                                f"data-path='{site / 'train.jsonl'}' device='cpu' state-dir='{site / 'state'}' "
                                f"policy='{site / 'policy.toml'}'")
            found.start_supernode(name)
        deploy.wait_online(len(SITES))
        yield found
    finally:
        deploy.stop()


def test_a_superlink_killed_mid_run_resumes_to_the_uninterrupted_result(sites):
    whole = sites.root / "coordinator" / "whole"
    done = sites.run_job(whole)
    assert (whole / "adapter" / "adapter_model.safetensors").is_file(), done.stdout[-3000:] + sites.logs()

    crashed = sites.root / "coordinator" / "crashed"
    job = sites.start_job(crashed)
    try:
        wait_for(crashed / "checkpoints" / "round-002" / "round.json", sites)
        sites.deploy.kill(sites.deploy.superlink)
        job.wait(timeout=120)  # `flwr run` gives up on the lost connection
    finally:
        if job.poll() is None:
            Deployment.kill(job)
    assert not (crashed / "summary.json").exists() and not (crashed / "checkpoints" / "round-003").exists()
    cut = status(crashed)
    deadline = time.monotonic() + 60  # Flower's ServerApp process exits when it sees its SuperLink gone
    while cut.returncode == 3 and time.monotonic() < deadline:
        time.sleep(1)
        cut = status(crashed)
    assert cut.returncode == 1 and "last complete round 2" in cut.stdout, cut.stdout + cut.stderr

    sites.deploy.start_superlink(database=sites.database)  # same state: the nodes stay registered
    sites.deploy.wait_online(len(SITES), timeout=120)  # the SuperNodes reconnect by themselves
    done = sites.run_job(crashed, resume="true")
    assert status(crashed).returncode == 0, done.stdout[-3000:] + sites.logs()

    assert [r["round"] for r in rows(crashed / "metrics.jsonl")] == [0, 1, 2, 3]
    ledger = rows(crashed / "privacy_ledger.jsonl")
    assert [r["round"] for r in ledger] == [r["round"] for r in rows(whole / "privacy_ledger.jsonl")] == [1, 2, 3]
    expected = load_file(whole / "adapter" / "adapter_model.safetensors")
    resumed = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


@pytest.mark.parametrize("min_nodes", [2, 1])
def test_a_supernode_killed_mid_run_fails_the_run_or_is_skipped_as_configured(sites, min_nodes):
    out = sites.root / "coordinator" / f"node-killed-{min_nodes}"
    sites.deploy.wait_online(len(SITES), timeout=120)  # (the last case leaves inst-b down)
    job = sites.start_job(out, f"strategy.num_rounds=2 strategy.min_train_nodes={min_nodes} "
                               "strategy.round_timeout_s=30")  # a round here takes about 7 s
    try:
        wait_for(out / "checkpoints" / "round-001" / "round.json", sites)
        sites.deploy.kill(sites.supernodes["inst-b"])  # the institution's machine dies
        job.wait(timeout=180)
    finally:
        if job.poll() is None:
            Deployment.kill(job)
    inst_b = rows(sites.root / "inst-b" / "state" / "audit-trail.jsonl")[-1]["node_id"]
    if min_nodes == 2:  # inst-b comes back for the next job, once the SuperLink counts it offline
        sites.deploy.wait_offline(inst_b)
        sites.start_supernode("inst-b")
    outcome = status(out)
    silent = "no reply within strategy.round_timeout_s = 30 s"
    if min_nodes == 2:
        assert outcome.returncode == 1, outcome.stdout + sites.logs()
        assert "round 2: 1 of 2 clients replied" in outcome.stdout and silent in outcome.stdout, outcome.stdout
        assert not (out / "summary.json").exists()
    else:
        assert outcome.returncode == 0, outcome.stdout + sites.logs()
        round_2 = rows(out / "metrics.jsonl")[2]
        assert round_2["clients"] == 1
        failure, = round_2["client_failures"]
        assert silent in failure
    assert f"node {inst_b}: {silent}" in outcome.stdout + json.dumps(rows(out / "metrics.jsonl"))  # its real id
