"""Flower strategies whose aggregation is fedft's: FedAvg and FedProx over adapter tensors.

Flower's ``FedAvg`` / ``FedProx`` keep what they do well (node sampling, the train
messages, FedProx's ``proximal-mu`` in the config); ``aggregate_train`` is replaced by
``fedft.aggregate`` on the adapter tensors and records the bytes each reply carried.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from fedft import wire
from fedft.aggregate import fedavg
from fedft.config import FedftConfig


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array data plus config strings in a message (what travels, less framing)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        elif not isinstance(record, MetricRecord):
            total += sum(len(str(v).encode()) for v in record.values())
    return total


@dataclass
class RoundReplies:
    """What the last aggregation saw."""

    node_ids: list[int] = field(default_factory=list)
    bytes_up: int = 0
    failures: list[str] = field(default_factory=list)
    train_loss: float | None = None
    num_examples: int = 0


class AdapterAggregation:
    """Mixin: aggregate replies' adapter tensors with ``fedft.aggregate.fedavg``."""

    last: RoundReplies

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, errors = self._check_and_log_replies(list(replies), is_train=True)
        self.last = RoundReplies(
            failures=[f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors]
        )
        if not valid:
            return None, None
        states = [m.content[wire.ARRAYS].to_torch_state_dict() for m in valid]
        weights = [float(m.content[wire.METRICS][wire.NUM_EXAMPLES]) for m in valid]
        losses = [float(m.content[wire.METRICS][wire.TRAIN_LOSS]) for m in valid]
        aggregated = fedavg(states, weights)
        self.last.node_ids = [m.metadata.src_node_id for m in valid]
        self.last.bytes_up = sum(payload_bytes(m.content) for m in valid)
        self.last.num_examples = int(sum(weights))
        self.last.train_loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
        metrics = MetricRecord({wire.TRAIN_LOSS: self.last.train_loss, wire.NUM_EXAMPLES: self.last.num_examples})
        return ArrayRecord(torch_state_dict=aggregated), metrics


class AdapterFedAvg(AdapterAggregation, FedAvg):
    """FedAvg (example-weighted) over LoRA adapter tensors."""


class AdapterFedProx(AdapterAggregation, FedProx):
    """FedProx: FedAvg plus ``proximal-mu`` in every train message (clients add the term)."""


def make_strategy(cfg: FedftConfig) -> AdapterFedAvg:
    """The strategy named by ``strategy.name`` with fedft's wire keys."""
    common = dict(
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.strategy.min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=cfg.strategy.min_train_nodes,
        weighted_by_key=wire.NUM_EXAMPLES,
        arrayrecord_key=wire.ARRAYS,
        configrecord_key=wire.CONFIG,
    )
    if cfg.strategy.name == "fedprox":
        return AdapterFedProx(proximal_mu=cfg.strategy.proximal_mu, **common)
    if cfg.strategy.name == "fedavg":
        return AdapterFedAvg(**common)
    raise ValueError(f"strategy.name = {cfg.strategy.name!r} is not a federated strategy")
