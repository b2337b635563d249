"""The message contract between the fedft ServerApp and ClientApp, defined once.

Both sides import these names; neither spells a key as a literal. A train message carries
the global adapter (``ARRAYS``) and a config record with the round, the resolved fedft
config as JSON (``CONFIG_JSON``) and, for FedProx, ``PROXIMAL_MU``. A reply carries the
new adapter (``ARRAYS``) and a metric record with ``REPLY_METRICS``.
Pure data: no flwr import, no I/O.
"""

from __future__ import annotations

import json

from fedft.config import FedftConfig, config_from_dict, config_to_dict

ARRAYS = "arrays"  # ArrayRecord key, both directions
CONFIG = "config"  # ConfigRecord key, server -> client
METRICS = "metrics"  # MetricRecord key, client -> server
CORRECTION = "scaffold-correction"  # ArrayRecord key, server -> client under SCAFFOLD: c - c_i

LORA_A = "lora_A"  # the two factors of a LoRA layer: every adapter tensor name has one
LORA_B = "lora_B"

SERVER_ROUND = "server-round"
CONFIG_JSON = "fedft-config"
PROXIMAL_MU = "proximal-mu"

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
LORA_RANK = "lora-rank"
CLIPPED = "clipped"  # DP-FedAvg: 1 if the update was scaled down to the clip norm
DP_SGD_SAMPLE_RATE = "dp-sgd-sample-rate"  # record-level DP: what this round spent
DP_SGD_NOISE = "dp-sgd-noise-multiplier"
DP_SGD_STEPS = "dp-sgd-steps"
LR_SUM = "lr-sum"  # SCAFFOLD: the sum of the round's per-step learning rates
REPLY_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_STEPS, LORA_RANK, CLIPPED,
                 DP_SGD_SAMPLE_RATE, DP_SGD_NOISE, DP_SGD_STEPS, LR_SUM)
DECLINED = "fedft-declined"  # reason prefix of an error reply: the client refused the round
FAILED = "fedft-failed"  # reason prefix of an error reply: the client failed (fedft.federated.public_errors)
DECLINED_CODE = 1001  # the application error code of a declined round
FAILED_CODE = 1002  # the application error code of a failed round

# Node config keys (simulation sets the first two; deployment sets data-path per institution).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
NODE_LORA_RANK = "lora-rank"  # deployment: this institution's LoRA rank (<= lora.r)
NODE_MAX_EPSILON = "max-epsilon"  # this institution's record-level privacy limit
NODE_STATE_DIR = "state-dir"  # where this institution keeps its DP-SGD spend across runs
NODE_DEVICE = "device"  # this institution's device: cpu, cuda, cuda:N (overrides model.device)
NODE_MODEL_PATH = "model-path"  # where this institution keeps the base model (overrides model.path)
NODE_POLICY = "policy"  # this institution's policy file (fedft.federated.policy)
DP_SGD_HISTORY = "fedft-dp-sgd-history"  # node state: the DP-SGD rounds this client ran


def encode_config(cfg: FedftConfig) -> str:
    """The resolved config as a JSON string for a ConfigRecord."""
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def decode_config(text: str) -> FedftConfig:
    """Inverse of ``encode_config``; validates like a file would."""
    return config_from_dict(json.loads(text), source="message config")
