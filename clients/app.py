"""The fedft Flower ClientApp (thin): unpack the message, train locally, reply with the adapter.

The server sends the resolved fedft config with every train message, so a client needs
no config file. A simulated client finds its data through the ``partition-id`` Flower
puts in its node config; a deployed institution names its own file with
``--node-config "data-path='...'"`` (and may set its own ``lora-rank``). The reply carries only adapter tensors and the
metrics named in ``fedft.federated.wire``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedft.config import FedftConfig, config_from_dict, config_to_dict
from fedft.federated import wire
from fedft.federated.client_round import run_client_round
from fedft.federated.validate import check_outgoing
from fedft.privacy.client_accountant import ClientDeclined, RecordLevelAccountant

DECLINED_CODE = 1001  # an application error code for "declined by the client"


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


def _history_file(context: Context, cfg) -> Path | None:
    """Where this client keeps its DP-SGD spend across runs: its node's ``state-dir``, or,
    for a simulated client, the run's ``privacy.client_state_dir``."""
    node = context.node_config
    if wire.NODE_STATE_DIR in node:
        return Path(str(node[wire.NODE_STATE_DIR])) / "dp-sgd-history.json"
    if wire.PARTITION_ID in node and cfg.privacy.client_state_dir:
        return Path(cfg.privacy.client_state_dir) / f"partition-{int(node[wire.PARTITION_ID])}.json"
    return None


def load_accountant(context: Context, path: Path | None) -> RecordLevelAccountant:
    """This client's DP-SGD history: from its state file, else from its node state (this run only)."""
    if path is not None and path.exists():
        return RecordLevelAccountant.load(path)
    if wire.DP_SGD_HISTORY in context.state:
        return RecordLevelAccountant.from_record(context.state[wire.DP_SGD_HISTORY])
    return RecordLevelAccountant()


def save_accountant(context: Context, path: Path | None, accountant: RecordLevelAccountant) -> None:
    context.state[wire.DP_SGD_HISTORY] = ConfigRecord(accountant.to_record())
    if path is not None:
        accountant.save(path)


def node_settings(cfg: FedftConfig, node) -> FedftConfig:
    """The server's config with this institution's own device and base-model location.

    ``--node-config "device='cuda:1'"`` places this client's model on a GPU of its choosing
    (or ``cpu``); ``model-path`` names where this institution keeps the same base model.
    The values are checked like config fields, so a typo names the node-config key.
    """
    model = cfg.model
    if wire.NODE_DEVICE in node:
        model = dataclasses.replace(model, device=str(node[wire.NODE_DEVICE]))
    if wire.NODE_MODEL_PATH in node:
        model = dataclasses.replace(model, path=str(node[wire.NODE_MODEL_PATH]))
    if model == cfg.model:
        return cfg
    data = config_to_dict(dataclasses.replace(cfg, model=model))
    return config_from_dict(data, source="--node-config")


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local QLoRA training from the global adapter in ``msg``."""
    config = msg.content[wire.CONFIG]
    node = context.node_config
    cfg = node_settings(wire.decode_config(str(config[wire.CONFIG_JSON])), node)
    partition_id = int(node[wire.PARTITION_ID]) if wire.PARTITION_ID in node else None
    data_path = str(node[wire.DATA_PATH]) if wire.DATA_PATH in node else None
    node_rank = int(node[wire.NODE_LORA_RANK]) if wire.NODE_LORA_RANK in node else None
    max_epsilon = float(node[wire.NODE_MAX_EPSILON]) if wire.NODE_MAX_EPSILON in node else None
    history_file = _history_file(context, cfg)
    accountant = load_accountant(context, history_file)
    generator = None
    if cfg.privacy.record_level and cfg.privacy.noise_seed >= 0:
        from fedft.privacy.dpfedavg import secure_generator

        generator = secure_generator(cfg.privacy.noise_seed * 1_000_003 + int(config[wire.SERVER_ROUND]))
    try:
        result = run_client_round(
            cfg,
            msg.content[wire.ARRAYS].to_torch_state_dict(),
            int(config[wire.SERVER_ROUND]),
            proximal_mu=float(config.get(wire.PROXIMAL_MU, 0.0)),
            partition_id=partition_id,
            data_path=data_path,
            client_index=partition_id if partition_id is not None else context.node_id % 1_000_003,
            node_rank=node_rank,
            accountant=accountant,
            max_epsilon=max_epsilon,
            noise_generator=generator,
        )
    except ClientDeclined as declined:
        return Message(error=Error(code=DECLINED_CODE, reason=f"{wire.DECLINED}: {declined}"), reply_to=msg)
    metrics = {
        wire.NUM_EXAMPLES: result.num_examples,
        wire.TRAIN_LOSS: result.train_loss,
        wire.TRAIN_STEPS: result.steps,
        wire.LORA_RANK: result.rank,
        wire.CLIPPED: int(result.clipped),
    }
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
    return Message(content=reply, reply_to=msg)
