"""One round as an institution runs it: check it against its policy, train, shape the reply.

``run_round`` is the whole of a client's round without Flower's message types: the round's
config (the coordinator's resolved fedft config as JSON), the global adapter tensors, and
the institution's own ``--node-config`` go in; a ``RoundOutcome`` comes out (the adapter
tensors and the metrics that may leave, or an error code with a reason that is either a
policy key or a fixed sentence). The ClientApp (clients/app.py) calls it in its own process;
a resident worker (clients/worker.py) calls it in the process that keeps the 4-bit base
loaded between rounds. ``state`` is node state that lasts the run: a mapping from a key to a
plain dict (Flower's node state, or the worker's own).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from fedft.config import FedftConfig
from fedft.federated import wire
from fedft.federated.admission import (
    Admission,
    NodeSettings,
    PolicyViolation,
    admit,
    announce,
    node_policy,
    node_rank,
    public_settings,
)
from fedft.federated.audit_trail import TrailRecorder, accepted_times, read_trail, spent_history
from fedft.federated.outgoing import check_outgoing
from fedft.federated.policy import OPTIONAL_METRICS
from fedft.federated.public_errors import public_reason
from fedft.privacy.client_accountant import ClientDeclined, RecordLevelAccountant

ANNOUNCED = "fedft-announced"  # node state: the config fingerprint whose settings were logged
OPTIMIZER_STATE = "fedft-optimizer-state"  # node state: this run's AdamW moments (train.keep_optimizer_state)


def client_log() -> logging.Logger:
    """fedft's client logger, shown on the SuperNode's (or the worker's) console."""
    logger = logging.getLogger("fedft.client")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


log = client_log()


@dataclass
class RoundRequest:
    """What the coordinator's train message asks: the round, its config, the global adapter."""

    run_id: int
    node_id: int
    round_index: int
    config_json: str
    arrays: dict  # name -> torch tensor (the global adapter, cut to this client)
    proximal_mu: float = 0.0
    correction: dict | None = None  # SCAFFOLD: c - c_i, name -> torch tensor


@dataclass
class RoundOutcome:
    """The reply: adapter tensors and metrics, or an error code and its public reason."""

    arrays: dict | None = None
    metrics: dict = field(default_factory=dict)
    error_code: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.error_code == 0


def guard_outgoing(arrays: Mapping, metrics: Mapping) -> None:
    """Refuse to send anything but adapter tensors and whitelisted metrics (fedft.federated.outgoing)."""
    check_outgoing({wire.ARRAYS: "arrays", wire.METRICS: "metrics"}, list(arrays), list(metrics))


def history_file(node: NodeSettings, cfg: FedftConfig) -> Path | None:
    """Where this client keeps its DP-SGD spend across runs: its node's ``state-dir``, or,
    for a simulated client, the run's ``privacy.client_state_dir``."""
    if node.state_dir is not None:
        return node.state_dir / "dp-sgd-history.json"
    if node.partition_id is not None and cfg.privacy.client_state_dir:
        return Path(cfg.privacy.client_state_dir) / f"partition-{node.partition_id}.json"
    return None


def load_accountant(state: Mapping, path: Path | None, trail: list | None = None) -> RecordLevelAccountant:
    """This client's DP-SGD history: from its state file, else from its node state (this run only).
    An audit trail that records more rounds than the state file wins (the larger spend)."""
    if path is not None and path.exists():
        accountant = RecordLevelAccountant.load(path)
    elif state.get(wire.DP_SGD_HISTORY) is not None:
        accountant = RecordLevelAccountant.from_record(state[wire.DP_SGD_HISTORY])
    else:
        accountant = RecordLevelAccountant()
    spent = spent_history(trail or [])
    return RecordLevelAccountant(spent) if len(spent) > len(accountant.history) else accountant


def save_accountant(state: MutableMapping, path: Path | None, accountant: RecordLevelAccountant) -> None:
    state[wire.DP_SGD_HISTORY] = accountant.to_record()
    if path is not None:
        accountant.save(path)


def kept_moments(state: Mapping, cfg: FedftConfig, round_index: int) -> dict | None:
    """This client's AdamW moments from its previous round in this run, when the round keeps them
    (``train.keep_optimizer_state``); they never leave the institution. None: a fresh AdamW."""
    if not cfg.train.keep_optimizer_state:
        return None
    kept = state.get(OPTIMIZER_STATE) if OPTIMIZER_STATE in state else None
    if kept is None:
        if round_index > 1:
            log.info("round %d: a fresh AdamW (this node holds no moments from an earlier round of the run, "
                     "e.g. after a restart)", round_index)
        return None
    from fedft.train.optimizer_state import from_bytes

    return from_bytes(kept["moments"])


def _announce_once(state: MutableMapping, admission: Admission, fingerprint: str) -> None:
    """Log which settings the coordinator chose, once per run and config (node state remembers)."""
    seen = state.get(ANNOUNCED)
    if seen is not None and seen.get("fingerprint") == fingerprint:
        return
    log.info("%s", announce(admission))
    state[ANNOUNCED] = {"fingerprint": fingerprint}


def run_round(request: RoundRequest, node_config: Mapping, state: MutableMapping) -> RoundOutcome:
    """One round of local QLoRA training from the global adapter, as the institution allows.

    Everything the round raises is caught here: a decline goes back with the policy key, a
    failure with its class and a fixed sentence (``public_reason``); the full text stays in
    this institution's log, never in the outcome.
    """
    record = TrailRecorder(request.run_id, request.node_id, request.round_index, request.config_json)
    try:
        node = NodeSettings.from_node_config(node_config)
        record.state_dir = node.state_dir
        policy = node_policy(node)
        record.delta = policy.privacy.delta
        trail = read_trail(node.state_dir) if node.state_dir is not None else []
        record.history = spent_history(trail)
        admission = admit(wire.decode_config(request.config_json), policy, node,
                          accepted_times=accepted_times(trail))
        record.delta = admission.institution_delta
        if not node.simulated:
            _announce_once(state, admission, record.fingerprint)
        return _train_admitted(request, state, node, policy, admission, trail, record)
    except ClientDeclined as declined:
        reason = str(declined) if isinstance(declined, PolicyViolation) else f"{record.limit_key}: {declined}"
        log.warning("round %d declined: %s", request.round_index, reason)
        record.declined(reason)
        return RoundOutcome(error_code=wire.DECLINED_CODE, reason=f"{wire.DECLINED}: {reason}")
    except Exception as error:  # noqa: BLE001 - nothing from the institution's data may reach the reply
        reason = public_reason(error)
        log.error("round %d failed (the coordinator is told only %r)", request.round_index, reason,
                  exc_info=True)
        record.failed(reason)
        return RoundOutcome(error_code=wire.FAILED_CODE, reason=reason)


def _train_admitted(request: RoundRequest, state: MutableMapping, node: NodeSettings, policy,
                    admission: Admission, trail: list, record: TrailRecorder) -> RoundOutcome:
    from fedft.federated.client_round import run_client_round

    cfg = admission.cfg
    record.limit_key = admission.limit_key
    path = history_file(node, cfg)
    accountant = load_accountant(state, path, trail)
    generator = None
    if cfg.privacy.record_level and cfg.privacy.noise_seed >= 0:  # a simulated client (or a policy allowing it)
        from fedft.privacy.dpfedavg import secure_generator

        generator = secure_generator(cfg.privacy.noise_seed * 1_000_003 + record.round_index)
    result = run_client_round(
        cfg,
        request.arrays,
        record.round_index,
        proximal_mu=request.proximal_mu,
        partition_id=node.partition_id,
        data_path=node.data_path,
        client_index=node.partition_id if node.partition_id is not None else request.node_id % 1_000_003,
        node_rank=node_rank(node, policy, cfg.lora),
        accountant=accountant,
        max_epsilon=admission.max_epsilon,
        min_noise_multiplier=admission.min_noise_multiplier,
        noise_generator=generator,
        correction=request.correction,
        optimizer_state=kept_moments(state, cfg, record.round_index),
    )
    if result.optimizer_state is not None:
        from fedft.train.optimizer_state import to_bytes

        state[OPTIMIZER_STATE] = {"moments": to_bytes(result.optimizer_state), "round": record.round_index}
    metrics = {
        wire.NUM_EXAMPLES: result.num_examples,
        wire.TRAIN_LOSS: result.train_loss,
        wire.TRAIN_STEPS: result.steps,
        wire.LORA_RANK: result.rank,
        wire.CLIPPED: int(result.clipped),
    }
    if result.lr_sum is not None:
        metrics[wire.LR_SUM] = result.lr_sum
    metrics = {k: v for k, v in metrics.items() if k not in OPTIONAL_METRICS or k in policy.reply.metrics}
    if result.dp_sgd is not None:
        save_accountant(state, path, accountant)
        metrics.update({wire.DP_SGD_SAMPLE_RATE: result.dp_sgd.sample_rate,
                        wire.DP_SGD_NOISE: result.dp_sgd.noise_multiplier,
                        wire.DP_SGD_STEPS: result.dp_sgd.steps})
    guard_outgoing(result.state, metrics)
    record.accepted(public_settings(admission), result.steps, result.dp_sgd, result.state, admission.model_sha256)
    return RoundOutcome(arrays=result.state, metrics=metrics)
