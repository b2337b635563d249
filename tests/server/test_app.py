"""The deployment ServerApp (``flwr run``): resume after a coordinator crash, and its run directory.

``server.app.main`` is called as Flower calls it, with a run config, over an in-process Grid
that delivers each round to the institutions' real ClientApps (tests/clients/inprocess.py).
A Grid that fails in round 2 stands in for a SuperLink killed mid-run; the job is started
again with ``resume=true`` and must end where an uninterrupted job ends.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from flwr.app import Error, Message, Metadata
from safetensors.torch import load_file

from fedft.run.status import run_status
from fedft.rundir import RunDirError, RunFailed
from tests.clients.inprocess import InProcessGrid, data_only, run_job, two_institutions


class SuperLinkDies(RuntimeError):
    pass


class DyingGrid(InProcessGrid):
    """Delivers round 1, then fails like a SuperLink that was killed."""

    rounds = 0

    def send_and_receive(self, messages, *, timeout=None):
        self.rounds += 1
        if self.rounds == 2:
            raise SuperLinkDies("Connection to the SuperLink is unavailable")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.fixture
def job(tiny_model_dir, tmp_path, task_identity):
    config, sites = two_institutions(tmp_path, tiny_model_dir)

    def start(grid_class, out, overrides="", **flags):
        run_job(config, data_only(sites), out, f"train.local_steps=2 {overrides}", grid_class, **flags)

    return start, tmp_path


def test_a_job_resumes_after_the_superlink_dies_and_ends_as_an_uninterrupted_one(job):
    start, root = job
    start(InProcessGrid, root / "whole")
    crashed = root / "crashed"
    with pytest.raises(SuperLinkDies):
        start(DyingGrid, crashed)
    assert (crashed / "checkpoints" / "round-001").is_dir() and not (crashed / "summary.json").exists()
    status = run_status(crashed)  # what `fedft status` tells a coordinator whose `flwr run` exited 0
    assert status.code == 1 and status.text.startswith("failed: SuperLinkDies: Connection to the SuperLink")
    assert "last complete round 1" in status.text
    with pytest.raises(RunDirError, match="already holds a run"):  # a restart must say resume or overwrite
        start(InProcessGrid, crashed)
    start(InProcessGrid, crashed, resume=True)
    rows = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    whole = load_file(root / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert run_status(crashed).code == 0 and not (crashed / "failed.json").exists()
    start(InProcessGrid, crashed, overwrite=True)  # a finished job replaced on request
    assert json.loads((crashed / "summary.json").read_text())["rounds"] == 2


class DeadClientAppGrid(InProcessGrid):
    """Node 12's ClientApp process dies: Flower answers for it, with the ServerApp's node as the sender."""

    def reply(self, message):
        if message.metadata.dst_node_id != 12:
            return super().reply(message)
        error = Error(code=0, reason="ClientApp process exited unexpectedly")
        return Message(error=error, metadata=Metadata(
            run_id=message.metadata.run_id, message_id="", src_node_id=1, dst_node_id=1,
            reply_to_message_id=message.metadata.message_id, group_id="", created_at=0.0, ttl=0,
            message_type="system"))


def test_a_failure_row_names_the_node_the_round_was_sent_to(job):
    start, root = job
    with pytest.raises(RunFailed, match="node 12: ClientApp process exited unexpectedly"):
        start(DeadClientAppGrid, root / "dead")
    row = json.loads((root / "dead" / "failed.json").read_text())
    assert "node 1:" not in row["message"]


class SilentNodeGrid(InProcessGrid):
    """Node 12 never answers (its SuperNode was killed): the round's timeout passes without its reply."""

    def send_and_receive(self, messages, *, timeout=None):
        return [r for r in super().send_and_receive(messages, timeout=timeout) if r.metadata.src_node_id != 12]


def test_a_node_that_never_replies_is_named_with_the_round_timeout(job):
    start, root = job
    started = time.monotonic()
    with pytest.raises(RunFailed, match=r"round 1: 1 of 2 clients replied .*node 12: no reply within "
                                        r"strategy.round_timeout_s = 2 s"):
        start(SilentNodeGrid, root / "silent", "strategy.round_timeout_s=2")
    assert time.monotonic() - started >= 2  # the server waited the whole timeout for node 12
    assert run_status(root / "silent").code == 1
