"""Admitting a coordinator's round at an institution: its message checked against the policy.

``NodeSettings`` is what the institution set on its SuperNode (``--node-config``): its data,
device, base-model location, LoRA rank, epsilon limit, state directory and policy file.
``admit`` takes the config a train message carries and returns the config this client will
actually train with: settings the policy or the node fix replace the message's, and a rule
the message breaks raises ``PolicyViolation`` naming the rule's key (nothing of the data).
It runs before any data is read. A simulated client (``partition-id``) is the operator's own
and trusts its config; a deployed one always applies a policy, the defaults when it names
no file. Pure: no torch, no flwr; the only I/O is hashing the pinned model's weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedft.config import FedftConfig, LoraConfig, config_from_dict, config_to_dict
from fedft.federated import wire
from fedft.federated.policy import (
    InstitutionPolicy,
    PolicyError,
    load_policy,
    weights_sha256,
)
from fedft.privacy.client_accountant import ClientDeclined

DAY_SECONDS = 86_400.0


class PolicyViolation(ClientDeclined):
    """The message asks for something the institution's policy (or node config) does not allow."""


@dataclass(frozen=True)
class NodeSettings:
    """What the institution set with ``--node-config`` (typed; a bad value names its key)."""

    partition_id: int | None = None  # simulation only
    data_path: str | None = None
    device: str | None = None
    model_path: str | None = None
    lora_rank: int | None = None
    max_epsilon: float | None = None
    state_dir: Path | None = None
    policy_path: str | None = None

    @property
    def simulated(self) -> bool:
        return self.partition_id is not None

    @classmethod
    def from_node_config(cls, node: Mapping) -> NodeSettings:
        def get(key: str, kind: type):
            if key not in node:
                return None
            try:
                return kind(node[key])
            except (TypeError, ValueError):
                raise PolicyError(f"--node-config {key} = {node[key]!r}: expected {kind.__name__}") from None

        state_dir = get(wire.NODE_STATE_DIR, str)
        return cls(partition_id=get(wire.PARTITION_ID, int), data_path=get(wire.DATA_PATH, str),
                   device=get(wire.NODE_DEVICE, str), model_path=get(wire.NODE_MODEL_PATH, str),
                   lora_rank=get(wire.NODE_LORA_RANK, int), max_epsilon=get(wire.NODE_MAX_EPSILON, float),
                   state_dir=Path(state_dir) if state_dir else None, policy_path=get(wire.NODE_POLICY, str))


def node_policy(node: NodeSettings) -> InstitutionPolicy:
    """The node's policy file, or the safe defaults; checked against the node's own keys."""
    policy = load_policy(node.policy_path) if node.policy_path else InstitutionPolicy()
    needs_history = policy.privacy.max_epsilon > 0 or policy.compute.max_rounds_per_day > 0
    if needs_history and node.state_dir is None:
        raise PolicyError(f"{policy.source}: privacy.max_epsilon and compute.max_rounds_per_day need a "
                          "state-dir in --node-config (where the rounds and the spend are kept across runs)")
    if policy.model.path and node.model_path and Path(node.model_path).resolve() != Path(policy.model.path):
        raise PolicyError(f"--node-config model-path differs from model.path in {policy.source}; keep one")
    return policy


@dataclass(frozen=True)
class Admission:
    """The config this client trains with, and how it differs from what the coordinator asked."""

    cfg: FedftConfig
    overridden: dict[str, tuple] = field(default_factory=dict)  # "section.field" -> (asked, applied)
    coordinator_chose: dict[str, object] = field(default_factory=dict)  # client-side settings left to it
    max_epsilon: float = 0.0  # the record-level limit this round is checked against (0: none)
    min_noise_multiplier: float = 0.0
    model_sha256: str = ""  # the checksum verified before loading ("" when the policy pins none)
    limit_key: str = "privacy.client_max_epsilon"  # where max_epsilon came from, named when a round is declined
    institution_delta: float = 1e-5  # the delta of the institution's own epsilon (audit trail, limit)


# Settings that shape what a client does with its machine and data (announced when the coordinator chose them).
CLIENT_SIDE = ("model.path", "model.quantization", "model.compute_dtype", "lora.r", "lora.alpha", "lora.dropout",
               "lora.target_modules", "data.max_length", "train.local_steps", "train.batch_size", "train.grad_accum",
               "train.learning_rate", "privacy.record_level", "privacy.user_level",
               "privacy.clip_norm", "privacy.dp_sgd_noise_multiplier", "privacy.dp_sgd_clip_norm",
               "privacy.dp_sgd_target_epsilon", "strategy.num_rounds", "strategy.aggregation")


def _get(data: dict, name: str):
    section, key = name.split(".")
    return data.get(section, {}).get(key)


def _set(data: dict, name: str, value) -> None:
    section, key = name.split(".")
    data.setdefault(section, {})[key] = value


def rounds_in_last_day(accepted_times: list[float], now: float) -> int:
    return sum(1 for t in accepted_times if now - DAY_SECONDS < t <= now)


class _Changes:
    """The asked config as a dict, and each value the node or the policy replaced in it."""

    def __init__(self, asked: FedftConfig) -> None:
        self.data = config_to_dict(asked)
        self.overridden: dict[str, tuple] = {}  # "section.field" -> (asked, applied)

    def get(self, name: str):
        return _get(self.data, name)

    def apply(self, name: str, value) -> None:
        if self.get(name) != value:
            self.overridden[name] = (self.get(name), value)
            _set(self.data, name, value)


def admit(asked: FedftConfig, policy: InstitutionPolicy, node: NodeSettings, *,
          accepted_times: list[float] = (), now: float | None = None, verify_model: bool = True) -> Admission:
    """The round ``asked`` as this institution allows it, or ``PolicyViolation`` naming the rule.

    ``accepted_times`` are the times of the rounds this institution accepted before (its audit
    trail), for ``compute.max_rounds_per_day``. A simulated node keeps its config, with only
    its device and base-model location applied.
    """
    changes = _Changes(asked)
    if node.device:
        changes.apply("model.device", node.device)
    if node.model_path:
        changes.apply("model.path", node.model_path)
    if node.simulated:
        limit_key = wire.NODE_MAX_EPSILON if node.max_epsilon else "privacy.client_max_epsilon"
        return Admission(_rebuild(changes.data, asked), changes.overridden,
                         max_epsilon=node.max_epsilon or asked.privacy.client_max_epsilon, limit_key=limit_key,
                         institution_delta=asked.privacy.delta)

    _apply_model_rules(changes, asked, policy, node)
    limit = _apply_privacy_rules(changes, asked, policy, node)
    # which of the institution's columns are instruction and answer is the institution's to say
    # ([fixed] data.columns), never the coordinator's: a message naming them could train on any column
    changes.apply("data.columns", {})
    for name, value in policy.fixed.items():
        changes.apply(name, value)
    _check_compute(changes.data, policy.compute, accepted_times, time.time() if now is None else now)
    _check_rank(asked, policy, node)
    cfg = _rebuild(changes.data, asked)
    sha = _verified_model_sha(policy) if verify_model else ""
    fixed = set(policy.fixed) | set(changes.overridden)
    chose = {name: changes.get(name) for name in CLIENT_SIDE if name not in fixed}
    limit_key = "privacy.max_epsilon" if limit and limit == policy.privacy.max_epsilon else wire.NODE_MAX_EPSILON
    return Admission(cfg, changes.overridden, chose, max_epsilon=limit,
                     min_noise_multiplier=policy.privacy.min_noise_multiplier, model_sha256=sha,
                     limit_key=limit_key, institution_delta=policy.privacy.delta)


def _apply_model_rules(changes: _Changes, asked: FedftConfig, policy: InstitutionPolicy, node: NodeSettings) -> None:
    """The policy's [model]: no remote code unless allowed, its quantization rule, base path and device."""
    model = policy.model
    if asked.model.trust_remote_code and not model.trust_remote_code:
        raise PolicyViolation("model.trust_remote_code: this institution does not run a model's own code")
    changes.apply("model.trust_remote_code", model.trust_remote_code)
    changes.apply("model.allow_unquantized", model.allow_unquantized)
    if model.path:
        changes.apply("model.path", model.path)
    if model.device or not node.device:
        changes.apply("model.device", model.device or "auto")


def _apply_privacy_rules(changes: _Changes, asked: FedftConfig, policy: InstitutionPolicy,
                         node: NodeSettings) -> float:
    """The policy's [privacy] (and the node's max-epsilon); returns the record-level limit (0: none)."""
    privacy = policy.privacy
    limit = min((v for v in (privacy.max_epsilon, node.max_epsilon) if v), default=0.0)
    if not asked.privacy.record_level and (privacy.require_record_level or limit):
        key = "privacy.require_record_level" if privacy.require_record_level else (
            "privacy.max_epsilon" if privacy.max_epsilon else "max-epsilon")
        raise PolicyViolation(f"{key}: this institution trains only with record-level DP-SGD "
                              "(the round asks privacy.record_level = false)")
    if asked.privacy.delta > privacy.delta:
        changes.apply("privacy.delta", privacy.delta)
    if asked.privacy.noise_seed >= 0 and not privacy.allow_fixed_noise_seed:
        changes.apply("privacy.noise_seed", -1)  # DP-SGD noise from the operating system's randomness
    return limit


def _check_rank(asked: FedftConfig, policy: InstitutionPolicy, node: NodeSettings) -> None:
    """A rank cap (policy or node) below the global rank is refused where every client needs that rank."""
    compute = policy.compute
    rank_cap = min((r for r in (node.lora_rank, compute.max_lora_rank) if r), default=0)
    if rank_cap and rank_cap < asked.lora.r and asked.strategy.name == "scaffold":
        key = "compute.max_lora_rank" if rank_cap == compute.max_lora_rank else wire.NODE_LORA_RANK
        raise PolicyViolation(f"{key}: lora.r = {asked.lora.r} > {rank_cap} and SCAFFOLD's control variates need "
                              "every client at the global rank")
    if compute.max_lora_rank and asked.lora.r > compute.max_lora_rank and asked.strategy.aggregation == "ffa":
        raise PolicyViolation(f"compute.max_lora_rank: lora.r = {asked.lora.r} > {compute.max_lora_rank} "
                              "and FFA-LoRA needs every client at the same rank")


def _verified_model_sha(policy: InstitutionPolicy) -> str:
    """The policy's pinned checksum once the base's weight files match it ("" when it pins none)."""
    if not policy.model.sha256:
        return ""
    if weights_sha256(policy.model.path) != policy.model.sha256:
        raise PolicyViolation("model.sha256: the base model's weight files do not match the policy's checksum")
    return policy.model.sha256


def _check_compute(data: dict, compute, accepted_times, now: float) -> None:
    bounds = (("compute.max_local_steps", "train.local_steps", compute.max_local_steps),
              ("compute.max_batch_size", "train.batch_size", compute.max_batch_size),
              ("compute.max_length", "data.max_length", compute.max_length))
    for key, name, bound in bounds:
        if bound and _get(data, name) > bound:
            raise PolicyViolation(f"{key}: the round asks {name} = {_get(data, name)} > {bound}")
    if compute.max_rounds_per_day:
        done = rounds_in_last_day(list(accepted_times), now)
        if done >= compute.max_rounds_per_day:
            raise PolicyViolation(f"compute.max_rounds_per_day: {done} rounds accepted in the last 24 hours "
                                  f"(at most {compute.max_rounds_per_day})")


def _rebuild(data: dict, asked: FedftConfig) -> FedftConfig:
    """The changed config, validated like a file (a fixed value out of range names its field)."""
    if data == config_to_dict(asked):
        return asked
    return config_from_dict(data, source="this institution's --node-config or policy")


def node_rank(node: NodeSettings, policy: InstitutionPolicy, lora: LoraConfig) -> int | None:
    """The LoRA rank this node trains: its lora-rank key, capped by compute.max_lora_rank and ``lora.r``."""
    ranks = [r for r in (node.lora_rank, policy.compute.max_lora_rank) if r]
    if not ranks:
        return None
    return min(min(ranks), lora.r)


def check_noise(planned_sigma: float, floor: float) -> None:
    """Decline a DP-SGD round whose noise multiplier is below the policy's floor."""
    if floor and planned_sigma < floor:
        raise PolicyViolation(f"privacy.min_noise_multiplier: the round's DP-SGD sigma {planned_sigma:.4g} "
                              f"is below {floor:g}")


def announce(admission: Admission) -> str:
    """The line a client logs once per run: what the coordinator chose and what the policy replaced."""
    chose = ", ".join(f"{k}={v!r}" for k, v in admission.coordinator_chose.items())
    replaced = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in admission.overridden.items())
    return (f"settings chosen by the coordinator: {chose or 'none'}; "
            f"replaced by this institution: {replaced or 'none'}")


def public_settings(admission: Admission) -> dict:
    """The overridden keys as the audit trail keeps them (values from the policy and the message only)."""
    return {k: {"asked": a, "applied": b} for k, (a, b) in admission.overridden.items()}

