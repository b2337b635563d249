"""Flower strategies whose aggregation is fedft's, over LoRA adapter tensors.

Flower's ``FedAvg`` / ``FedProx`` keep what they do well (node sampling, the train
messages, FedProx's ``proximal-mu`` in the config); Flower's ``FedAdam`` / ``FedYogi`` /
``FedAvgM`` keep their server optimizer, applied to the aggregated adapter as a
pseudo-gradient. What fedft replaces (``AdapterAggregation``): each client's message is
cut to what it needs (its LoRA rank, B only under FFA-LoRA, the wire dtype), and
``aggregate_train`` combines replies with ``fedft.federated.exchange.aggregate_replies``
(fedavg / ffa / svd), recording bytes, the naive average's error and the SVD energy cut.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedft.config import FedftConfig
from fedft.federated import wire
from fedft.federated.exchange import (
    aggregate_replies,
    content_order,
    downlink_state,
    private_aggregate,
)
from fedft.federated.tensor_bytes import fill_array_record, state_from_record
from fedft.federated.validate import reply_problem
from fedft.privacy.dpfedavg import secure_generator


def to_array_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """``state`` as Flower's ArrayRecord, its .npy headers cached (fedft.federated.tensor_bytes)."""
    return fill_array_record(ArrayRecord(), state, Array)


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
class CollectedReplies:
    """One round's replies after validation: what was accepted, and what was not and why."""

    accepted: list[Message] = field(default_factory=list)
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)  # accepted adapters, in order
    failures: list[str] = field(default_factory=list)  # error replies, "node N: reason"
    refusals: list[int] = field(default_factory=list)  # nodes that declined the round
    rejected: list[str] = field(default_factory=list)  # replies the server refused, with the reason

    @property
    def node_ids(self) -> list[int]:
        return [m.metadata.src_node_id for m in self.accepted]

    @property
    def weights(self) -> list[float]:
        return [float(m.content[wire.METRICS][wire.NUM_EXAMPLES]) for m in self.accepted]

    @property
    def train_loss(self) -> float | None:
        """Example-weighted mean over the replies that report a loss (an institution's policy may withhold it)."""
        pairs = [(w, float(m.content[wire.METRICS][wire.TRAIN_LOSS])) for w, m in zip(self.weights, self.accepted)
                 if wire.TRAIN_LOSS in m.content[wire.METRICS]]
        total = sum(w for w, _ in pairs)
        return sum(w * loss for w, loss in pairs) / total if total else None

    @property
    def ranks(self) -> dict[int, int]:
        """Node id -> the LoRA rank it trained."""
        return {m.metadata.src_node_id: int(m.content[wire.METRICS].get(wire.LORA_RANK, 0)) for m in self.accepted}

    @property
    def clipped_fraction(self) -> float | None:
        """DP-FedAvg: the share of accepted replies that were clipped to C."""
        clipped = [int(m.content[wire.METRICS].get(wire.CLIPPED, 0)) for m in self.accepted]
        return sum(clipped) / len(clipped) if clipped else None

    @property
    def record_level(self) -> dict[int, dict]:
        """Node -> the DP-SGD it spent this round (nodes that ran DP-SGD)."""
        spent = {}
        for m in self.accepted:
            metrics = m.content[wire.METRICS]
            if int(metrics.get(wire.DP_SGD_STEPS, 0)) > 0:
                spent[m.metadata.src_node_id] = {
                    "sample_rate": float(metrics[wire.DP_SGD_SAMPLE_RATE]),
                    "noise_multiplier": float(metrics[wire.DP_SGD_NOISE]),
                    "steps": int(metrics[wire.DP_SGD_STEPS]),
                }
        return spent

    @property
    def bytes_up(self) -> int:
        return sum(payload_bytes(m.content) for m in self.accepted)


# Combination statistics travel in the aggregated MetricRecord (a server optimizer passes it on).
NAIVE_ERROR = "naive-aggregation-error"
DISCARDED_ENERGY = "svd-discarded-energy"


class AdapterAggregation:
    """Mixin: per-client downlink payloads and fedft's aggregation of the replies."""

    def __init__(self, cfg: FedftConfig | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._bind(cfg)

    def _bind(self, cfg: FedftConfig | None) -> None:
        self.fedft_cfg = cfg
        self.node_ranks: dict[int, int] = {}  # node id -> the LoRA rank it trains
        self.global_state: dict[str, torch.Tensor] = {}  # the adapter this round started from
        self.sampled: list[int] = []  # node ids this round was sent to
        self.num_nodes = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's hook: ``configure_adapter`` with the global adapter as tensors."""
        return self.configure_adapter(server_round, state_from_record(arrays), config, grid)

    def configure_state(
        self, server_round: int, state: dict[str, torch.Tensor], config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The round's messages from the global adapter as tensors (what fedft's round loop calls).

        Without a server optimizer this is ``configure_adapter`` itself: the adapter is not turned
        into an ArrayRecord only to be turned back.
        """
        return self.configure_adapter(server_round, state, config, grid)

    def configure_adapter(
        self, server_round: int, state: dict[str, torch.Tensor], config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's sampling and messages, each payload cut to what its client needs.

        Clients that train the same rank share one payload record, as Flower's FedAvg shares one
        among all its messages.
        """
        self.global_state = state
        messages = list(super().configure_train(server_round, ArrayRecord(), config, grid))  # sampling + config
        self.num_nodes = len(messages)
        privacy = self.fedft_cfg.privacy
        if privacy.poisson_clients:  # each client independently with probability q
            coin = (random.SystemRandom() if privacy.noise_seed < 0
                    else random.Random(privacy.noise_seed * 7_919 + server_round))
            messages = [m for m in messages if coin.random() < privacy.client_sampling_rate]
        self.sampled = [m.metadata.dst_node_id for m in messages]
        payloads: dict[int | None, ArrayRecord] = {}  # rank -> the record every client of that rank gets
        shaped = []
        for message in messages:
            node = message.metadata.dst_node_id
            rank = self.node_ranks.get(node)
            if rank not in payloads:
                payloads[rank] = to_array_record(downlink_state(self.fedft_cfg.strategy, self.global_state, rank))
            content = RecordDict({wire.ARRAYS: payloads[rank], wire.CONFIG: message.content[wire.CONFIG]})
            shaped.append(Message(content=content, message_type=message.metadata.message_type,
                                  dst_node_id=node))
        return shaped

    def collect_replies(self, server_round: int, replies: Iterable[Message],
                        sent_to: dict[str, int] | None = None) -> CollectedReplies:
        """Validate the replies: errors and declines are named, a bad update is named and left out.

        ``sent_to`` (message id -> the node it was sent to) names an error reply by the node the
        round was sent to: Flower builds some error replies itself (a ClientApp that died, a
        reply whose upload expired) with its own node id as the sender. A node that sent nothing
        before ``strategy.round_timeout_s`` (e.g. its SuperNode was killed) is a failure too.
        """
        valid, errors = self._check_and_log_replies(list(replies), is_train=True)
        sent_to = sent_to or {}

        def node_of(m: Message) -> int:
            return sent_to.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)

        answered = {m.metadata.reply_to_message_id for m in list(valid) + list(errors)}
        silent = [node for message_id, node in sent_to.items() if message_id not in answered]
        timeout = self.fedft_cfg.strategy.round_timeout_s
        collected = CollectedReplies(
            failures=[f"node {node_of(m)}: {m.error.reason}" for m in errors]
            + [f"node {node}: no reply within strategy.round_timeout_s = {timeout:g} s" for node in silent],
            refusals=[node_of(m) for m in errors if str(m.error.reason or "").startswith(wire.DECLINED)],
        )
        for m in valid:
            state = state_from_record(m.content[wire.ARRAYS])
            problem = reply_problem(self.fedft_cfg.strategy, self.fedft_cfg.privacy, self.global_state, state)
            if problem is None:
                collected.accepted.append(m)
                collected.states.append(state)
            else:
                collected.rejected.append(f"node {m.metadata.src_node_id}: {problem}")
        order = content_order(collected.states, collected.weights)  # not arrival order: reproducible sums
        collected.accepted = [collected.accepted[i] for i in order]
        collected.states = [collected.states[i] for i in order]
        self.node_ranks.update({n: r for n, r in collected.ranks.items() if r > 0})
        return collected

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message] | CollectedReplies
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's hook: ``combine`` as an ArrayRecord.

        Takes the round's messages, or what ``collect_replies`` made of them (fedft's round
        loop collects first, to record failures and rejections).
        """
        collected = (replies if isinstance(replies, CollectedReplies)
                     else self.collect_replies(server_round, replies))
        state, metrics = self.combine(server_round, collected)
        return (None if state is None else to_array_record(state)), metrics

    def aggregate_state(
        self, server_round: int, collected: CollectedReplies
    ) -> tuple[dict[str, torch.Tensor] | None, MetricRecord | None]:
        """The round's new global adapter as tensors, and its metrics (what fedft's round loop calls).

        Without a server optimizer this is ``combine`` itself, with no ArrayRecord in between.
        """
        return self.combine(server_round, collected)

    def combine(
        self, server_round: int, collected: CollectedReplies
    ) -> tuple[dict[str, torch.Tensor] | None, MetricRecord | None]:
        """Combine the accepted replies with ``strategy.aggregation`` (DP-FedAvg's noise under user-level DP)."""
        cfg = self.fedft_cfg
        poisson = cfg.privacy.poisson_clients
        if not collected.accepted and not poisson:  # (a Poisson round may be empty: its update is noise alone)
            return None, None
        if cfg.privacy.user_level:  # equal weights, fixed denominator: see fedft.privacy.dpfedavg
            seed = cfg.privacy.noise_seed
            generator = secure_generator(None if seed < 0 else seed * 100_003 + server_round)
            denominator = (cfg.privacy.client_sampling_rate * self.num_nodes if poisson
                           else len(self.sampled))
            result = private_aggregate(cfg.strategy, cfg.privacy, self.global_state, collected.states, denominator,
                                       generator)
        else:
            result = aggregate_replies(cfg.strategy, self.global_state, collected.states, collected.weights,
                                       rank=cfg.lora.r)
        metrics = {wire.TRAIN_LOSS: collected.train_loss or 0.0, wire.NUM_EXAMPLES: int(sum(collected.weights))}
        if result.naive_error is not None:
            metrics[NAIVE_ERROR] = result.naive_error
        if result.discarded_energy is not None:
            metrics[DISCARDED_ENERGY] = result.discarded_energy
        # in the global adapter's order (FFA rebuilt A after B): Flower's server optimizers pair tensors by position
        ordered = {**{k: result.state[k] for k in self.global_state if k in result.state}, **result.state}
        return ordered, MetricRecord(metrics)

    def server_optimizer_state(self) -> dict[str, torch.Tensor]:
        """The server optimizer's moments (empty without one), for checkpoints."""
        out = {}
        for name in ("m_t", "v_t"):  # FedAdam / FedYogi
            for key, value in (getattr(self, name, None) or {}).items():
                out[f"{name}/{key}"] = torch.from_numpy(np.array(value))
        momentum = getattr(self, "momentum_vector", None)  # FedAvgM
        for index, value in enumerate(momentum or []):
            out[f"momentum/{index}"] = torch.from_numpy(np.array(value))
        return out

    def restore_server_optimizer(self, saved: dict[str, torch.Tensor]) -> None:
        """Put back the moments ``server_optimizer_state`` saved (resuming a run)."""
        for name in ("m_t", "v_t"):
            values = {k.split("/", 1)[1]: v.numpy() for k, v in saved.items() if k.startswith(f"{name}/")}
            if values:
                setattr(self, name, values)
        momentum = sorted((int(k.split("/", 1)[1]), v.numpy()) for k, v in saved.items()
                          if k.startswith("momentum/"))
        if momentum:
            self.momentum_vector = [v for _, v in momentum]


class AdapterFedAvg(AdapterAggregation, FedAvg):
    """FedAvg (example-weighted) over LoRA adapter tensors."""


class AdapterFedProx(AdapterAggregation, FedProx):
    """FedProx: FedAvg plus ``proximal-mu`` in every train message (clients add the term)."""


def expected_lr_sum(cfg: FedftConfig, round_index: int) -> float:
    """The sum of a client's per-step learning rates in ``round_index`` under the run's schedule."""
    from fedft.federated.scaffold import lr_sum
    from fedft.train.local import lr_multiplier

    t = cfg.train
    first, total = (round_index - 1) * t.local_steps, cfg.strategy.num_rounds * t.local_steps
    return lr_sum(t.learning_rate, [lr_multiplier(first + k, total, t) for k in range(t.local_steps)])


class AdapterScaffold(AdapterFedAvg):
    """SCAFFOLD: FedAvg plus control variates (``fedft.federated.scaffold``).

    Each train message carries the client's correction ``c - c_i`` beside the adapter (cut to
    its rank, in the wire dtype: the downlink doubles); replies carry the adapter and
    ``lr-sum``, from which the server updates ``c_i`` and ``c`` itself (nothing else travels up).
    The new adapter is ``x + server_lr * (FedAvg of the replies - x)``.
    """

    def _bind(self, cfg: FedftConfig | None) -> None:
        super()._bind(cfg)
        self.variates = None  # ControlVariates, made from the first round's adapter
        self.population = 0  # clients the SuperLink knows (SCAFFOLD's N)

    def configure_adapter(self, server_round: int, state: dict[str, torch.Tensor], config: ConfigRecord, grid: Grid
                          ) -> list[Message]:
        from fedft.federated.scaffold import ControlVariates

        messages = super().configure_adapter(server_round, state, config, grid)
        nodes = set(grid.get_node_ids())
        self.population = max(len(nodes), len(messages))
        if self.variates is not None and self.variates.clients and not nodes & set(self.variates.clients):
            # a resumed simulation draws new node ids: the saved c_i belong to no one now, and c averaged them
            self.variates = None
        if self.variates is None:
            self.variates = ControlVariates(self.global_state)
        for message in messages:
            node = message.metadata.dst_node_id
            correction = downlink_state(self.fedft_cfg.strategy, self.variates.correction_for(node),
                                        self.node_ranks.get(node))
            message.content[wire.CORRECTION] = to_array_record(correction)
        return messages

    def combine(self, server_round: int, collected: CollectedReplies
                ) -> tuple[dict[str, torch.Tensor] | None, MetricRecord | None]:
        averaged, metrics = super().combine(server_round, collected)
        if averaged is None:
            return averaged, metrics
        x = self.global_state
        lr = self.fedft_cfg.strategy.server_lr
        new = {k: x[k] + lr * (averaged[k] - x[k]) for k in x}
        answers = {}
        expected = expected_lr_sum(self.fedft_cfg, server_round)
        for message, state in zip(collected.accepted, collected.states):
            lr_sum = float(message.content[wire.METRICS].get(wire.LR_SUM, 0.0))
            # a reply without it (withheld by the institution's policy) leaves its c_i as it was; one far from the
            # config's schedule (x100 either way) is not trusted: a tiny lr-sum would blow up c for every client
            if lr_sum > 0 and expected / 100 <= lr_sum <= expected * 100:
                full = {k: state[k].to(torch.float32) if k in state else x[k] for k in x}
                answers[message.metadata.src_node_id] = (full, lr_sum)
        self.variates.update(x, answers, self.population)
        return new, metrics

    def server_optimizer_state(self) -> dict[str, torch.Tensor]:
        out = super().server_optimizer_state()
        if self.variates is not None:
            out.update({f"scaffold/{k}": v for k, v in self.variates.to_tensors().items()})
        return out

    def restore_server_optimizer(self, saved: dict[str, torch.Tensor]) -> None:
        super().restore_server_optimizer(saved)
        mine = {k[len("scaffold/"):]: v for k, v in saved.items() if k.startswith("scaffold/")}
        if mine:
            from fedft.federated.scaffold import ControlVariates

            self.variates = ControlVariates({k[2:]: v for k, v in mine.items() if k.startswith("c/")})
            self.variates.restore(mine)


# A server optimizer sits before AdapterFedAvg in the method order, so Flower's FedOpt /
# FedAvgM step runs on the adapter that fedft's aggregation produced. Their __init__ does not
# pass unknown arguments on, so fedft's config is bound after it.
class _ServerOptimizer:
    def __init__(self, cfg: FedftConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        self._bind(cfg)

    def configure_state(self, server_round: int, state: dict[str, torch.Tensor], config: ConfigRecord, grid: Grid
                        ) -> list[Message]:
        """Flower's optimizer keeps the round's arrays in its ``configure_train``: through it."""
        return list(self.configure_train(server_round, to_array_record(state), config, grid))

    def aggregate_state(self, server_round: int, collected: CollectedReplies
                        ) -> tuple[dict[str, torch.Tensor] | None, MetricRecord | None]:
        """Flower's optimizer step works on ArrayRecords: through its ``aggregate_train``."""
        arrays, metrics = self.aggregate_train(server_round, collected)
        return (None if arrays is None else state_from_record(arrays)), metrics


class AdapterFedAdam(_ServerOptimizer, FedAdam, AdapterFedAvg):
    """FedAdam (Reddi et al. 2021) on the aggregated adapter update."""


class AdapterFedYogi(_ServerOptimizer, FedYogi, AdapterFedAvg):
    """FedYogi (Reddi et al. 2021) on the aggregated adapter update."""


class AdapterFedAvgM(_ServerOptimizer, FedAvgM, AdapterFedAvg):
    """FedAvgM (Hsu et al. 2019): server momentum on the aggregated adapter update."""


def make_strategy(cfg: FedftConfig) -> AdapterAggregation:
    """The strategy named by ``strategy.name`` / ``server_optimizer``, with fedft's wire keys."""
    common = dict(
        cfg=cfg,
        # with Poisson client sampling every node gets a message, then configure_train thins them
        fraction_train=1.0 if cfg.privacy.poisson_clients else cfg.strategy.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.strategy.min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=cfg.strategy.min_train_nodes,
        weighted_by_key=wire.NUM_EXAMPLES,
        arrayrecord_key=wire.ARRAYS,
        configrecord_key=wire.CONFIG,
    )
    s = cfg.strategy
    if s.name == "fedprox":
        return AdapterFedProx(proximal_mu=s.proximal_mu, **common)
    if s.name == "scaffold":
        return AdapterScaffold(**common)
    if s.name != "fedavg":
        raise ValueError(f"strategy.name = {s.name!r} is not a federated strategy")
    if s.server_optimizer == "fedavgm":
        return AdapterFedAvgM(server_learning_rate=s.server_lr, server_momentum=s.server_momentum, **common)
    if s.server_optimizer in ("fedadam", "fedyogi"):
        cls = AdapterFedAdam if s.server_optimizer == "fedadam" else AdapterFedYogi
        return cls(eta=s.server_lr, eta_l=cfg.train.learning_rate, beta_1=s.server_momentum,
                   beta_2=s.server_beta2, tau=s.server_tau, **common)
    return AdapterFedAvg(**common)
