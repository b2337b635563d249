"""The fedft Flower ClientApp (thin): hand the round to the institution's side, reply.

The server sends the resolved fedft config with every train message. A simulated client
(``partition-id`` in its node config) is the operator's own and follows it. A deployed
institution decides what it accepts: its ``--node-config`` (``data-path``, ``device``,
``model-path``, ``lora-rank``, ``max-epsilon``, ``state-dir``, ``policy``) and its policy
file are applied by ``fedft.federated.admission.admit`` before any data is read; a broken
rule declines the round with the rule's key (clients/institution.py runs the round). The
reply carries only adapter tensors and the metrics the policy lets leave; a failure carries
only its error class (``fedft.federated.public_errors``). Each round is appended to the
institution's audit trail.

With ``worker='/path/to/socket'`` in its node config, the ClientApp only forwards the round
to the institution's resident worker (``fedft node serve``, clients/worker.py), which keeps
the 4-bit base and the prepared data loaded between rounds and applies its own node config
and policy; this process then imports neither torch nor transformers.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableMapping

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

from fedft.federated import wire

WORKER = "worker"  # node config key: the resident worker's Unix socket


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
    """Refuse to send anything but adapter tensors and whitelisted metrics (fedft.federated.outgoing)."""
    from fedft.federated.outgoing import check_outgoing

    kinds = {key: "arrays" if isinstance(record, ArrayRecord) else
             "metrics" if isinstance(record, MetricRecord) else "config" for key, record in reply.items()}
    arrays = [name for record in reply.values() if isinstance(record, ArrayRecord) for name in record]
    metrics = [name for record in reply.values() if isinstance(record, MetricRecord) for name in record]
    check_outgoing(kinds, arrays, metrics)


class FlowerNodeState(MutableMapping):
    """Flower's node state (a RecordDict of ConfigRecords) seen as a mapping of plain dicts."""

    def __init__(self, records: RecordDict) -> None:
        self.records = records

    def __getitem__(self, key: str) -> dict:
        return dict(self.records[key])

    def __setitem__(self, key: str, value: dict) -> None:
        self.records[key] = ConfigRecord(value)

    def __delitem__(self, key: str) -> None:
        del self.records[key]

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local QLoRA training from the global adapter in ``msg``, as the institution allows.

    Everything the round raises is caught on the institution's side: a decline goes back with
    the policy key, a failure with its class and a fixed sentence; the full text stays in the
    institution's log, never in the reply (Flower would send ``str(exception)``).
    """
    config = msg.content[wire.CONFIG]
    round_index = int(config[wire.SERVER_ROUND])
    config_json = str(config[wire.CONFIG_JSON])
    proximal_mu = float(config.get(wire.PROXIMAL_MU, 0.0))
    if WORKER in context.node_config:
        return _forward_to_worker(msg, context, round_index, config_json, proximal_mu)
    from flwr.app import Array

    from clients.institution import RoundRequest, run_round
    from fedft.federated.tensor_bytes import fill_array_record, state_from_record

    correction = (state_from_record(msg.content[wire.CORRECTION]) if wire.CORRECTION in msg.content
                  else None)
    request = RoundRequest(context.run_id, context.node_id, round_index, config_json,
                           state_from_record(msg.content[wire.ARRAYS]), proximal_mu, correction)
    outcome = run_round(request, context.node_config, FlowerNodeState(context.state))
    if not outcome.ok:
        return Message(error=Error(code=outcome.error_code, reason=outcome.reason), reply_to=msg)
    reply = RecordDict({wire.ARRAYS: fill_array_record(ArrayRecord(), outcome.arrays, Array),
                        wire.METRICS: MetricRecord(outcome.metrics)})
    guard_reply(reply)
    return Message(content=reply, reply_to=msg)


def _forward_to_worker(msg: Message, context: Context, round_index: int, config_json: str,
                       proximal_mu: float) -> Message:
    """The round handed to the institution's resident worker; its answer becomes the reply.

    Only the worker's socket is read from this node config: the worker applies its own. A
    worker that cannot be reached fails the round with a fixed sentence.
    """
    from collections import OrderedDict

    from flwr.app import Array

    from clients.worker_link import CORRECTION_PREFIX, WorkerUnavailable, ask_worker

    arrays = {name: array.numpy() for name, array in msg.content[wire.ARRAYS].items()}
    if wire.CORRECTION in msg.content:  # SCAFFOLD's c - c_i travels beside the adapter, its names prefixed
        arrays.update({CORRECTION_PREFIX + name: array.numpy() for name, array in msg.content[wire.CORRECTION].items()})
    header = {"run_id": context.run_id, "node_id": context.node_id, "round": round_index,
              "config_json": config_json, "proximal_mu": proximal_mu}
    try:
        answer, reply_arrays = ask_worker(str(context.node_config[WORKER]), header, arrays)
    except WorkerUnavailable as error:
        logging.getLogger("fedft.client").error("round %d: %s", round_index, error)
        reason = f"{wire.FAILED}: WorkerUnavailable: its resident worker did not answer"
        return Message(error=Error(code=wire.FAILED_CODE, reason=reason), reply_to=msg)
    if answer.get("error_code"):
        return Message(error=Error(code=int(answer["error_code"]), reason=str(answer["reason"])), reply_to=msg)
    reply = RecordDict({
        wire.ARRAYS: ArrayRecord(OrderedDict((name, Array(value)) for name, value in reply_arrays.items())),
        wire.METRICS: MetricRecord(answer["metrics"]),
    })
    guard_reply(reply)
    return Message(content=reply, reply_to=msg)
