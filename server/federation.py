"""A federated round over Flower's Grid: configure, send, receive, aggregate.

``FlowerRounds`` is the federated kind of ``fedft.run.loop.Rounds``: it drives a Flower
strategy's hooks (``configure_train`` and ``aggregate_train`` in the forms that take and give
the adapter as tensors, ``configure_state`` and ``aggregate_state``, with fedft's
``collect_replies`` between) over a ``Grid`` itself instead of calling ``Strategy.start``, because
fedft records more per round than ``start`` exposes (bytes each way, failures and rejected
updates, what each client spent on privacy). Everything else a run does (evaluation,
checkpoints, ledger, summary, final stages, report) is fedft's run loop. The same code
runs under the Simulation Engine and the Deployment Engine.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedft.config import FedftConfig
from fedft.eval.held_out import HeldOutEvaluator
from fedft.federated import wire
from fedft.model.adapter import adapter_nbytes, save_adapter
from fedft.run.loop import RoundPrivacy, RoundResult, RunLoop, StopRun
from fedft.rundir import RunFailed
from server.strategy import (
    DISCARDED_ENERGY,
    NAIVE_ERROR,
    CollectedReplies,
    make_strategy,
    payload_bytes,
)


class FederationError(RunFailed):
    """A round could not complete."""


REPLY_POLL_S = 0.1  # over the network (a SuperLink); Flower's deployment grid waits 3 s
IN_PROCESS_POLL_S = 0.01  # the Simulation Engine's grid: a pull is a lock and a lookup in this process


def reply_poll_s(grid: Grid) -> float:
    """How often a round asks ``grid`` for its replies: every 10 ms on the Simulation Engine's in-process
    grid (0.1 s cost 50 ms a round on average, 2 s over a 40-round run), 0.1 s over the network."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # pragma: no cover - a Flower that moved it: the network interval is still correct
        return REPLY_POLL_S
    return IN_PROCESS_POLL_S if isinstance(grid, InMemoryGrid) else REPLY_POLL_S


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout_s: float,
                     poll_s: float = REPLY_POLL_S) -> list[Message]:
    """``Grid.send_and_receive``, asking for the replies every ``poll_s`` seconds.

    Flower's deployment grid sleeps 3 s between pulls, so the last reply of a round waited
    on the SuperLink 1.5 s on average (up to 3 s) before the ServerApp saw it. Same
    contract: push the messages, pull until every one has its reply or ``timeout_s`` passed,
    return the replies that came.
    """
    waiting = {i for i in grid.push_messages(messages) if i}  # a message Flower could not push has no id
    deadline = time.monotonic() + timeout_s
    replies: list[Message] = []
    while True:
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        if not waiting or time.monotonic() >= deadline:
            return replies
        time.sleep(poll_s)


def planned_sample_size(cfg: FedftConfig, num_nodes: int) -> int:
    """How many clients Flower's FedAvg samples per round (its own formula)."""
    return max(int(num_nodes * cfg.strategy.fraction_train), cfg.strategy.min_train_nodes)


class FlowerRounds:
    """Federated rounds: the global adapter out to the sampled clients, their updates back."""

    stage, resumable = "federated", True

    def __init__(self, grid: Grid, cfg: FedftConfig, evaluator: HeldOutEvaluator) -> None:
        self.grid, self.cfg, self.evaluator = grid, cfg, evaluator
        self.strategy = make_strategy(cfg)
        self.train_config = ConfigRecord({wire.CONFIG_JSON: wire.encode_config(cfg)})

    def headline(self, state) -> str:
        return (f"fedft: {self.cfg.strategy.name} over {self.cfg.simulation.num_supernodes} clients, "
                f"{self.cfg.strategy.num_rounds} rounds; adapter {adapter_nbytes(state) / 1e6:.2f} MB")

    def start(self, first_round: int) -> None:
        random.seed(self.cfg.seed + first_round - 1)  # Flower's node sampling draws from the global RNG

    def population(self) -> tuple[int, int]:
        num_nodes = len(list(self.grid.get_node_ids()))
        return num_nodes, planned_sample_size(self.cfg, num_nodes)

    def train(self, round_index: int, state) -> RoundResult:
        messages = self.strategy.configure_state(round_index, state, self.train_config, self.grid)
        replies = send_and_receive(self.grid, messages, self.cfg.strategy.round_timeout_s, reply_poll_s(self.grid))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        collected = self.strategy.collect_replies(round_index, replies, sent_to)
        new_state, metrics = self.strategy.aggregate_state(round_index, collected)
        self._check_enough(round_index, new_state, collected, len(messages))
        row = self._row(collected, messages, new_state, metrics)
        privacy = RoundPrivacy(sampled=list(self.strategy.sampled), replied=collected.node_ids,
                               clipped_fraction=collected.clipped_fraction if self.cfg.privacy.user_level else None,
                               record_level=collected.record_level, refusals=collected.refusals)
        notes = (*(f"  rejected update from {r}" for r in collected.rejected),
                 *(f"  {failure}" for failure in collected.failures))
        return RoundResult(new_state, row, privacy, notes)

    def _check_enough(self, round_index: int, new_state, collected: CollectedReplies, sent: int) -> None:
        """Too few valid replies end the run: quietly when they declined at a privacy limit."""
        cfg = self.cfg
        accepted = len(collected.accepted)
        if not (new_state is None or (accepted < cfg.strategy.min_train_nodes and not cfg.privacy.poisson_clients)):
            return
        if collected.refusals and len(collected.refusals) == len(collected.failures):
            raise StopRun(f"round {round_index}: {len(collected.refusals)} of {sent} clients declined and too few "
                          f"remain (strategy.min_train_nodes = {cfg.strategy.min_train_nodes}); stopping after "
                          f"round {round_index - 1}", declines=collected.failures)
        raise FederationError(
            f"round {round_index}: {accepted} of {sent} clients replied "
            f"(strategy.min_train_nodes = {cfg.strategy.min_train_nodes}) with a valid update; "
            "failures and rejected updates: "
            + ("; ".join(collected.failures + collected.rejected) or "none reported"))

    def _row(self, collected: CollectedReplies, messages: list, new_state: dict, metrics) -> dict:
        bytes_down = sum(payload_bytes(m.content) for m in messages)
        bytes_up, clients = collected.bytes_up, len(collected.accepted)
        row = {
            "train_loss": collected.train_loss,
            "clients": clients,
            "client_failures": collected.failures,
            "rejected_updates": collected.rejected,
            "num_examples": int(sum(collected.weights)),
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
            "bytes_up_per_client": bytes_up / max(1, clients),
            "bytes_down_per_client": bytes_down / max(1, len(messages)),
            "adapter_bytes": adapter_nbytes(new_state),
            "aggregation": self.cfg.strategy.aggregation,
            "aggregation_error": metrics.get(NAIVE_ERROR),
            "client_ranks": sorted(collected.ranks.values()),
        }
        if DISCARDED_ENERGY in metrics:
            row["svd_discarded_energy"] = metrics[DISCARDED_ENERGY]
        return row

    def evaluate(self, state) -> dict:
        return self.evaluator(state)

    def save(self, state, directory: Path, extras: dict | None = None, *, model_card: bool = True) -> None:
        save_adapter(self.evaluator.model, state, directory, extras, model_card=model_card)

    def optimizer_state(self) -> dict:
        return self.strategy.server_optimizer_state()

    def restore_optimizer(self, saved: dict) -> None:
        self.strategy.restore_server_optimizer(saved)


def run_federation(
    grid: Grid, cfg: FedftConfig, out_dir: Path, progress: Callable[[str], None] = print,
    resume: bool = False,
) -> dict:
    """Every round, then summary, final stages and report (``fedft.run.loop``); returns summary.json.

    With ``resume`` the run continues after its latest complete checkpoint (same config):
    adapter, metrics, privacy ledger and server optimizer state come from that checkpoint.
    """
    evaluator = HeldOutEvaluator(cfg)
    loop = RunLoop(cfg, out_dir, FlowerRounds(grid, cfg, evaluator), resume=resume, progress=progress)
    return loop.run(evaluator.initial_state)
