"""The fedft Flower ClientApp (thin): check the round against the institution, train, reply.

The server sends the resolved fedft config with every train message. A simulated client
(``partition-id`` in its node config) is the operator's own and follows it. A deployed
institution decides what it accepts: its ``--node-config`` (``data-path``, ``device``,
``model-path``, ``lora-rank``, ``max-epsilon``, ``state-dir``, ``policy``) and its policy
file are applied by ``fedft.federated.admission.admit`` before any data is read; a broken
rule declines the round with the rule's key. The reply carries only adapter tensors and the
metrics the policy lets leave; a failure carries only its error class
(``fedft.federated.public_errors``). Each round is appended to the institution's audit trail.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

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
from fedft.federated.audit_trail import (
    TrailRecorder,
    accepted_times,
    read_trail,
    spent_history,
)
from fedft.federated.client_round import run_client_round
from fedft.federated.policy import OPTIONAL_METRICS
from fedft.federated.public_errors import public_reason
from fedft.federated.validate import check_outgoing
from fedft.privacy.client_accountant import ClientDeclined, RecordLevelAccountant

DECLINED_CODE = 1001  # an application error code for "declined by the client"
FAILED_CODE = 1002  # an application error code for "failed at the client" (the reason is public_reason's)
ANNOUNCED = "fedft-announced"  # node state: the config fingerprint whose settings were logged


def _client_log() -> logging.Logger:
    """fedft's client logger, shown on the SuperNode's console (flwr-clientapp configures none)."""
    logger = logging.getLogger("fedft.client")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


log = _client_log()


def _quiet_simulated_client() -> None:
    """Under ``fedft simulate`` without ``--verbose`` (simulations/console.py) each Ray actor
    inherits FEDFT_QUIET_LOGGERS: set those loggers to ERROR (importing flwr set its own to
    DEBUG) and ignore DeprecationWarning again (importing flwr put "show each once" ahead of
    PYTHONWARNINGS). Elsewhere the variable is unset and nothing changes."""
    names = os.environ.get("FEDFT_QUIET_LOGGERS")
    if not names:
        return
    for name in names.split(","):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


_quiet_simulated_client()


def guard_reply(reply: RecordDict) -> None:
    """Refuse to send anything but adapter tensors and whitelisted metrics (fedft.federated.validate)."""
    kinds = {key: "arrays" if isinstance(record, ArrayRecord) else
             "metrics" if isinstance(record, MetricRecord) else "config" for key, record in reply.items()}
    arrays = [name for record in reply.values() if isinstance(record, ArrayRecord) for name in record]
    metrics = [name for record in reply.values() if isinstance(record, MetricRecord) for name in record]
    check_outgoing(kinds, arrays, metrics)


def _history_file(context: Context, node: NodeSettings, cfg: FedftConfig) -> Path | None:
    """Where this client keeps its DP-SGD spend across runs: its node's ``state-dir``, or,
    for a simulated client, the run's ``privacy.client_state_dir``."""
    if node.state_dir is not None:
        return node.state_dir / "dp-sgd-history.json"
    if node.partition_id is not None and cfg.privacy.client_state_dir:
        return Path(cfg.privacy.client_state_dir) / f"partition-{node.partition_id}.json"
    return None


def load_accountant(context: Context, path: Path | None, trail: list | None = None) -> RecordLevelAccountant:
    """This client's DP-SGD history: from its state file, else from its node state (this run only).
    An audit trail that records more rounds than the state file wins (the larger spend)."""
    if path is not None and path.exists():
        accountant = RecordLevelAccountant.load(path)
    elif wire.DP_SGD_HISTORY in context.state:
        accountant = RecordLevelAccountant.from_record(context.state[wire.DP_SGD_HISTORY])
    else:
        accountant = RecordLevelAccountant()
    spent = spent_history(trail or [])
    return RecordLevelAccountant(spent) if len(spent) > len(accountant.history) else accountant


def save_accountant(context: Context, path: Path | None, accountant: RecordLevelAccountant) -> None:
    context.state[wire.DP_SGD_HISTORY] = ConfigRecord(accountant.to_record())
    if path is not None:
        accountant.save(path)


def _announce_once(context: Context, admission: Admission, fingerprint: str) -> None:
    """Log which settings the coordinator chose, once per run and config (node state remembers)."""
    seen = context.state.get(ANNOUNCED)
    if seen is not None and seen.get("fingerprint") == fingerprint:
        return
    log.info("%s", announce(admission))
    context.state[ANNOUNCED] = ConfigRecord({"fingerprint": fingerprint})


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local QLoRA training from the global adapter in ``msg``, as the institution allows.

    Everything the round raises is caught here: a decline goes back with the policy key, a
    failure with its class and a fixed sentence (``public_reason``); the full text stays in
    this institution's log, never in the reply (Flower would send ``str(exception)``).
    """
    config = msg.content[wire.CONFIG]
    round_index = int(config[wire.SERVER_ROUND])
    config_json = str(config[wire.CONFIG_JSON])
    record = TrailRecorder(context.run_id, context.node_id, round_index, config_json)
    try:
        node = NodeSettings.from_node_config(context.node_config)
        record.state_dir = node.state_dir
        policy = node_policy(node)
        record.delta = policy.privacy.delta
        trail = read_trail(node.state_dir) if node.state_dir is not None else []
        record.history = spent_history(trail)
        admission = admit(wire.decode_config(config_json), policy, node, accepted_times=accepted_times(trail))
        record.delta = admission.institution_delta
        if not node.simulated:
            _announce_once(context, admission, record.fingerprint)
        return _train_admitted(msg, context, node, policy, admission, trail, record)
    except ClientDeclined as declined:
        reason = str(declined) if isinstance(declined, PolicyViolation) else f"{record.limit_key}: {declined}"
        log.warning("round %d declined: %s", round_index, reason)
        record.declined(reason)
        return Message(error=Error(code=DECLINED_CODE, reason=f"{wire.DECLINED}: {reason}"), reply_to=msg)
    except Exception as error:  # noqa: BLE001 - nothing from the institution's data may reach the reply
        reason = public_reason(error)
        log.error("round %d failed (the coordinator is told only %r)", round_index, reason,
                  exc_info=True)
        record.failed(reason)
        return Message(error=Error(code=FAILED_CODE, reason=reason), reply_to=msg)


def _train_admitted(msg: Message, context: Context, node: NodeSettings, policy, admission: Admission,
                    trail: list, record: TrailRecorder) -> Message:
    cfg = admission.cfg
    record.limit_key = admission.limit_key
    history_file = _history_file(context, node, cfg)
    accountant = load_accountant(context, history_file, trail)
    generator = None
    if cfg.privacy.record_level and cfg.privacy.noise_seed >= 0:  # a simulated client (or a policy allowing it)
        from fedft.privacy.dpfedavg import secure_generator

        generator = secure_generator(cfg.privacy.noise_seed * 1_000_003 + record.round_index)
    config = msg.content[wire.CONFIG]
    result = run_client_round(
        cfg,
        msg.content[wire.ARRAYS].to_torch_state_dict(),
        record.round_index,
        proximal_mu=float(config.get(wire.PROXIMAL_MU, 0.0)),
        partition_id=node.partition_id,
        data_path=node.data_path,
        client_index=node.partition_id if node.partition_id is not None else context.node_id % 1_000_003,
        node_rank=node_rank(node, policy, cfg),
        accountant=accountant,
        max_epsilon=admission.max_epsilon,
        min_noise_multiplier=admission.min_noise_multiplier,
        noise_generator=generator,
    )
    metrics = {
        wire.NUM_EXAMPLES: result.num_examples,
        wire.TRAIN_LOSS: result.train_loss,
        wire.TRAIN_STEPS: result.steps,
        wire.LORA_RANK: result.rank,
        wire.CLIPPED: int(result.clipped),
    }
    metrics = {k: v for k, v in metrics.items() if k not in OPTIONAL_METRICS or k in policy.reply.metrics}
    if result.dp_sgd is not None:
        save_accountant(context, history_file, accountant)
        metrics.update({wire.DP_SGD_SAMPLE_RATE: result.dp_sgd.sample_rate,
                        wire.DP_SGD_NOISE: result.dp_sgd.noise_multiplier,
                        wire.DP_SGD_STEPS: result.dp_sgd.steps})
    reply = RecordDict({
        wire.ARRAYS: ArrayRecord(torch_state_dict=result.state),
        wire.METRICS: MetricRecord(metrics),
    })
    guard_reply(reply)
    record.accepted(public_settings(admission), result.steps, result.dp_sgd, result.state, admission.model_sha256)
    return Message(content=reply, reply_to=msg)
