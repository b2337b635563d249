"""Faults injected into real deployments on 127.0.0.1: processes killed mid-run.

Each scenario has its own SuperLink (TLS, SuperNode authentication, its state in a SQLite file so
that registrations survive a restart) and institutions, each a ``flower-supernode`` beside its
resident worker (``fedft node serve``). Jobs are started with ``flwr run`` as a coordinator would:

- the SuperLink is SIGKILLed after round 1's checkpoint of a 2-round DP job (Flower's ServerApp
  process, detached from it, notices and exits, which releases the run directory), started again
  on the same database, and the job is started again with ``resume=true``: the final adapter
  equals, bit for bit, that of the same job run without interruption, and the privacy ledger
  holds each round once. Deterministic because both jobs run on the same nodes (node ids, hence
  client seeds, are the same), DP-SGD noise comes from a fixed seed the institutions' policies
  allow, and the mean of two updates does not depend on the order in which they arrive;
- three institutions under ``strategy.min_train_nodes = 2`` whose SuperNodes are SIGKILLed one
  at a time: after the first death the round goes on with two and records the silent node by
  its node id (with Flower's "Node Unavailable" or fedft's round timeout, whichever comes
  first); after the second the run fails and ``fedft status`` exits 1 with the reason.

The two scenarios run side by side (the second in a thread): both mostly wait on Flower.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedft.demo.tasks import make_demo_rows, write_jsonl
from fedft.deploy.certs import make_node_key
from tests.conftest import TINY_TOML
from tests.simulations.deployment import ROOT, Deployment, tool

pytestmark = pytest.mark.slow

SITES = ("inst-a", "inst-b")
ROUND_TIMEOUT_S = 150  # the scenario with killed SuperNodes
JOB = ("train.local_steps=2 privacy.record_level=true privacy.dp_sgd_noise_multiplier=1.0 "
       "privacy.noise_seed=7 strategy.eval_every=0")  # no held-out scoring between rounds: faster


class Sites:
    """The deployment plus what the tests restart: an institution's SuperNode, the SuperLink."""

    def __init__(self, deploy: Deployment, root: Path):
        self.deploy, self.root = deploy, root
        self.database = root / "coordinator" / "superlink.db"
        self.config = root / "coordinator" / "deploy.toml"
        self.supernodes: dict[str, subprocess.Popen] = {}

    def start_site(self, name: str, index: int) -> None:
        """An institution: its rows, a policy that allows the job's fixed noise seed, a registered
        key, its resident worker and its SuperNode."""
        site = self.root / name
        rows = make_demo_rows(3, 16, 0.9, seed=0)
        write_jsonl([r for r in rows if r["institution"] == f"inst{index}"], site / "train.jsonl")
        (site / "policy.toml").write_text("[privacy]\nallow_fixed_noise_seed = true\n")
        make_node_key(site / "keys", "node")
        done = self.deploy.flwr("supernode", "register", str(site / "keys" / "node.pub"), "coordinator")
        assert done.returncode == 0, done.stdout + done.stderr
        self.deploy.start_worker(f"{name}-worker", site / "run" / "worker.sock",
                                 f"data-path='{site / 'train.jsonl'}' device='cpu' state-dir='{site / 'state'}' "
                                 f"policy='{site / 'policy.toml'}'")
        self.start_supernode(name)

    def node_id(self, name: str) -> int:
        """The institution's node id, from its own audit trail."""
        return rows(self.root / name / "state" / "audit-trail.jsonl")[-1]["node_id"]

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


@contextlib.contextmanager
def deployed(root: Path, names: tuple[str, ...], model: Path) -> Iterator[Sites]:
    """A SuperLink (state in a SQLite file) and the named institutions, all online; stopped after."""
    coordinator = root / "coordinator"
    write_jsonl(make_demo_rows(2, 4, 0.5, seed=1), coordinator / "eval.jsonl")
    config = TINY_TOML.format(model=model).replace('train_files = ["train.jsonl"]\n', "")
    (coordinator / "deploy.toml").write_text(config)
    deploy = Deployment(root)
    found = Sites(deploy, root)
    try:
        deploy.start_superlink(database=found.database)
        for index, name in enumerate(names):
            found.start_site(name, index)
        deploy.wait_online(len(names))
        yield found
    finally:
        deploy.stop()


def kill_supernodes_mid_run(root: Path, model: Path) -> tuple[Sites, Path]:
    """Three institutions, ``min_train_nodes = 2``: inst-c's SuperNode is killed once round 1 is
    checkpointed, inst-b's once round 2 is. Returns the (stopped) sites and the job's out-dir."""
    with deployed(root, ("inst-a", "inst-b", "inst-c"), model) as sites:
        out = root / "coordinator" / "run"
        # without DP-SGD (this scenario is about nodes, not privacy); a round takes about 8 s, round 1 (each
        # worker loads its base) more than 75 s on a 2-core machine running the whole suite: the timeout leaves
        # room for that (a killed node is named by Flower's heartbeat check after about 60 s in any case)
        job = sites.start_job(out, "privacy.record_level=false strategy.num_rounds=3 strategy.min_train_nodes=2 "
                                   f"strategy.round_timeout_s={ROUND_TIMEOUT_S}")
        try:
            for round_index, name in ((1, "inst-c"), (2, "inst-b")):  # the institution's machine dies
                wait_for(out / "checkpoints" / f"round-{round_index:03d}" / "round.json", sites,
                         timeout=ROUND_TIMEOUT_S + 120)
                sites.deploy.kill(sites.supernodes[name])
            job.wait(timeout=ROUND_TIMEOUT_S + 120)
        finally:
            if job.poll() is None:
                Deployment.kill(job)
        return sites, out


@pytest.fixture(scope="module")
def supernodes_killed(tmp_path_factory, tiny_model_dir):
    """``kill_supernodes_mid_run`` on its own deployment, in a thread started at once: both scenarios
    spend most of their time waiting on Flower's polls and timeouts, so they run side by side.
    (The model is written here, in this thread: transformers' lazy imports are not thread-safe.)"""
    root, outcome = tmp_path_factory.mktemp("nodes-killed"), {}

    def scenario() -> None:
        try:
            outcome["result"] = kill_supernodes_mid_run(root, tiny_model_dir)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test that reads it
            outcome["error"] = error

    thread = threading.Thread(target=scenario, name="supernodes-killed")
    thread.start()

    def result() -> tuple[Sites, Path]:
        thread.join(timeout=600)
        assert not thread.is_alive(), "the SuperNode scenario did not end within 10 minutes"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    yield result
    thread.join(timeout=600)


@pytest.fixture(scope="module")
def sites(tmp_path_factory, tiny_model_dir):
    with deployed(tmp_path_factory.mktemp("superlink-killed"), SITES, tiny_model_dir) as found:
        yield found


def test_a_superlink_killed_mid_run_resumes_to_the_uninterrupted_result(supernodes_killed, sites):
    # (asking for supernodes_killed first starts that scenario now, beside this one)
    whole = sites.root / "coordinator" / "whole"
    done = sites.run_job(whole)
    assert (whole / "adapter" / "adapter_model.safetensors").is_file(), done.stdout[-3000:] + sites.logs()

    crashed = sites.root / "coordinator" / "crashed"
    job = sites.start_job(crashed)
    try:
        wait_for(crashed / "checkpoints" / "round-001" / "round.json", sites)
        sites.deploy.kill(sites.deploy.superlink)
        job.wait(timeout=120)  # `flwr run` gives up on the lost connection
    finally:
        if job.poll() is None:
            Deployment.kill(job)
    assert not (crashed / "summary.json").exists() and not (crashed / "checkpoints" / "round-002").exists()
    cut = status(crashed)
    deadline = time.monotonic() + 60  # Flower's ServerApp process exits when it sees its SuperLink gone
    while cut.returncode == 3 and time.monotonic() < deadline:
        time.sleep(1)
        cut = status(crashed)
    assert cut.returncode == 1 and "last complete round 1" in cut.stdout, cut.stdout + cut.stderr

    sites.deploy.start_superlink(database=sites.database)  # same state: the nodes stay registered
    sites.deploy.wait_online(len(SITES), timeout=120)  # the SuperNodes reconnect by themselves
    done = sites.run_job(crashed, resume="true")
    assert status(crashed).returncode == 0, done.stdout[-3000:] + sites.logs()

    assert [r["round"] for r in rows(crashed / "metrics.jsonl")] == [0, 1, 2]
    ledger = rows(crashed / "privacy_ledger.jsonl")
    assert [r["round"] for r in ledger] == [r["round"] for r in rows(whole / "privacy_ledger.jsonl")] == [1, 2]
    expected = load_file(whole / "adapter" / "adapter_model.safetensors")
    resumed = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_supernodes_killed_mid_run_are_skipped_until_too_few_remain(supernodes_killed):
    sites, out = supernodes_killed()
    # the silent node is named by its node id; whichever comes first says why: Flower's heartbeat
    # check ("Node Unavailable", 2 x 30 s after the last heartbeat) or fedft's round timeout
    silent = (rf"(no reply within strategy\.round_timeout_s = {ROUND_TIMEOUT_S} s"
              r"|Error: Node Unavailable .*heartbeat.*)")
    round_2 = rows(out / "metrics.jsonl")[2]
    failure, = round_2["client_failures"]
    assert round_2["clients"] == 2 and re.fullmatch(f"node {sites.node_id('inst-c')}: {silent}", failure), failure
    outcome = status(out)  # `flwr run --stream` itself exits 0 (Flower 1.42)
    assert outcome.returncode == 1, outcome.stdout + sites.logs()
    # round 3 is sent to inst-c too unless Flower already counts it offline
    assert re.search(r"round 3: 1 of [23] clients replied", outcome.stdout), outcome.stdout
    assert re.search(f"node {sites.node_id('inst-b')}: {silent}", outcome.stdout), outcome.stdout
    assert not (out / "summary.json").exists()
