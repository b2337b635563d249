"""An institution's policy: what its client accepts from the coordinator, in a TOML file it owns.

A deployed institution names the file with ``--node-config "policy='/etc/fedft/policy.toml'"``;
``fedft policy init`` writes a commented template (``policy_template``). The policy pins the
base model (a local directory and the SHA-256 of its weight files), decides whether remote
code may run, sets a privacy floor (record-level DP-SGD required, epsilon over the whole
collaboration at the institution's own delta, a minimum noise multiplier, no fixed noise
seed), compute bounds (local steps, batch, sequence length, LoRA rank, rounds per day),
which optional metrics may leave, and ``[fixed]`` settings that are the institution's
whatever a message says. Without a file the safe defaults of ``InstitutionPolicy()`` apply.

``fedft.federated.admission`` applies a policy to an incoming message. This module only
reads and checks the file, and hashes the pinned model's weight files: no torch, no flwr.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedft.config import SECTIONS, ConfigError, option
from fedft.config.loading import build_section, read_toml, where_in_file
from fedft.federated import wire

# The metrics a reply may leave out: the server needs the others (weights, ranks, the DP-SGD spend).
OPTIONAL_METRICS = (wire.TRAIN_LOSS, wire.TRAIN_STEPS, wire.LR_SUM)  # lr-sum: only under SCAFFOLD
# What [fixed] may set: settings that change only this institution's own training.
FIXABLE = ("model.device", "model.compute_dtype", "data.max_length", "data.columns", "lora.dropout",
           "privacy.dp_sgd_noise_multiplier", "privacy.dp_sgd_clip_norm", "privacy.dp_sgd_target_epsilon",
           *(f"train.{f.name}" for f in dataclasses.fields(SECTIONS["train"])))
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


class PolicyError(ConfigError):
    """The policy file is missing, malformed or contradicts itself (the institution's own error)."""


@dataclass(frozen=True)
class ModelPolicy:
    """The base model this institution loads, and whether its code may run."""

    path: str = ""  # a local directory; "" lets the node's model-path, else the coordinator's model.path, decide
    sha256: str = option("", "64 hex digits (fedft policy init computes it), or ''",
                         check=lambda v: v == "" or (len(v) == 64 and all(c in "0123456789abcdef" for c in v)))
    trust_remote_code: bool = False  # only ever from here: a message's model.trust_remote_code is never obeyed
    # train a base whose layers bitsandbytes leaves partly in full precision (more memory); only ever from here
    allow_unquantized: bool = False
    device: str = ""  # cpu, cuda, cuda:N, auto; "" keeps the node's device key, else 'auto'


@dataclass(frozen=True)
class PrivacyPolicy:
    """The privacy floor no message can lower."""

    require_record_level: bool = False  # decline rounds that do not run DP-SGD
    max_epsilon: float = option(0.0, "a number >= 0 (0: no limit)")  # record-level, over every run in state-dir
    delta: float = option(1e-5, "a number in (0, 1)")  # the institution's delta: its epsilon is counted here
    min_noise_multiplier: float = option(0.0, "a number >= 0")  # DP-SGD sigma at least this
    allow_fixed_noise_seed: bool = False  # a message's privacy.noise_seed is ignored unless this is true


@dataclass(frozen=True)
class ComputePolicy:
    """How much work one message may ask of this institution's machine (0: no bound)."""

    max_local_steps: int = option(0, "an integer >= 0")
    max_batch_size: int = option(0, "an integer >= 0")
    max_length: int = option(0, "an integer >= 0")  # data.max_length, tokens per example
    max_lora_rank: int = option(0, "an integer >= 0")  # a higher lora.r is trained at this rank
    max_rounds_per_day: int = option(0, "an integer >= 0")  # rounds accepted in any 24 hours (needs state-dir)


@dataclass(frozen=True)
class ReplyPolicy:
    """Which optional metrics may leave with an update."""

    metrics: tuple[str, ...] = option(OPTIONAL_METRICS, "a list of " + ", ".join(OPTIONAL_METRICS),
                                      check=lambda v: set(v) <= set(OPTIONAL_METRICS))


@dataclass(frozen=True)
class InstitutionPolicy:
    """The whole policy; ``InstitutionPolicy()`` is the safe default for a node without a file."""

    model: ModelPolicy = field(default_factory=ModelPolicy)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    compute: ComputePolicy = field(default_factory=ComputePolicy)
    reply: ReplyPolicy = field(default_factory=ReplyPolicy)
    fixed: dict[str, Any] = field(default_factory=dict)  # "section.field" -> value, see FIXABLE
    source: str = ""  # the file it came from ("" for the defaults)


POLICY_SECTIONS = {"model": ModelPolicy, "privacy": PrivacyPolicy, "compute": ComputePolicy, "reply": ReplyPolicy}


def _check_limits(section: str, values, source: str, lines: list[str]) -> None:
    for f in dataclasses.fields(values):
        limit = f.metadata
        if limit and not limit["check"](getattr(values, f.name)):
            where = where_in_file(source, lines, section, f.name)
            raise PolicyError(f"{where}: {section}.{f.name} = {getattr(values, f.name)!r} is not allowed; "
                              f"expected {limit['allowed']}")


def _check_fixed(fixed: dict, source: str, lines: list[str]) -> dict[str, Any]:
    """``[fixed]`` as {"section.field": value}; each key must be FIXABLE (checked again, typed, on use)."""
    flat = {}
    for section, part in fixed.items():
        if not isinstance(part, dict):
            raise PolicyError(f"{source}: [fixed] {section} must be a table of fields, got {part!r}")
        for key, value in part.items():
            flat[f"{section}.{key}"] = value
    for name in flat:
        if name not in FIXABLE:
            raise PolicyError(f"{where_in_file(source, lines, 'fixed.' + name.split('.')[0], name.split('.')[1])}: "
                              f"[fixed] {name} cannot be fixed by an institution; allowed: {', '.join(FIXABLE)}")
    return flat


def policy_from_dict(raw: dict, source: str, text: str = "") -> InstitutionPolicy:
    """Build and check a policy from parsed TOML; errors name the file, line and key."""
    lines = text.splitlines()
    raw = dict(raw)
    parts = {}
    for name, cls in POLICY_SECTIONS.items():
        part = raw.pop(name, {})
        if not isinstance(part, dict):
            raise PolicyError(f"{source}: [{name}] must be a table, got {part!r}")
        try:
            parts[name] = build_section(cls, part, name, source, lines)
        except ConfigError as err:
            raise PolicyError(str(err)) from None
        _check_limits(name, parts[name], source, lines)
    fixed = _check_fixed(raw.pop("fixed", {}), source, lines)
    if raw:
        raise PolicyError(f"{source}: unknown table(s) {', '.join(sorted(raw))}; allowed: "
                          + ", ".join(f"[{s}]" for s in (*POLICY_SECTIONS, "fixed")))
    policy = InstitutionPolicy(**parts, fixed=fixed, source=source)
    model = policy.model
    if model.trust_remote_code and not (model.path and model.sha256):
        raise PolicyError(f"{source}: model.trust_remote_code = true needs model.path and model.sha256 "
                          "(remote code runs only from the pinned, checksummed model)")
    if model.sha256 and not model.path:
        raise PolicyError(f"{source}: model.sha256 needs model.path (the directory it is the checksum of)")
    if model.path and not Path(model.path).is_dir():
        raise PolicyError(f"{source}: model.path = {model.path!r} is not a local directory")
    return policy


def load_policy(path: str | Path) -> InstitutionPolicy:
    """The policy in ``path`` (a TOML file); relative model paths are relative to the file."""
    path = Path(path)
    raw, text = read_toml(path, f"policy file {path} does not exist (write one with `fedft policy init`)",
                          PolicyError)
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str) and model["path"]:
        raw["model"] = {**model, "path": str((path.parent / model["path"]).resolve())}
    return policy_from_dict(raw, str(path), text)


def weights_sha256(model_dir: str | Path) -> str:
    """One SHA-256 over a model directory's weight files: each file's name and digest, in name order."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise PolicyError(f"{model_dir} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    total = hashlib.sha256()
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        total.update(f"{path.relative_to(model_dir).as_posix()} {digest.hexdigest()}\n".encode())
    return total.hexdigest()


def policy_template(model_path: str = "", sha256: str = "", state_dir_hint: str = "/var/lib/fedft") -> str:
    """The commented policy file ``fedft policy init`` writes (every default spelled out)."""
    metrics = ", ".join(f'"{m}"' for m in OPTIONAL_METRICS)
    return f'''# fedft institution policy: what this institution's client accepts from the coordinator.
# Name it when starting the SuperNode:
#   flower-supernode ... --node-config "data-path='...' state-dir='{state_dir_hint}' policy='/path/to/this.toml'"
# Every incoming round is checked against this file before any data is read. A round that
# breaks a rule is declined; the coordinator sees the rule's key, never this institution's
# data, paths or error text. Settings in [fixed] replace the coordinator's.

[model]
# The only base model this client loads (a local directory) and the SHA-256 of its weight
# files: a different checksum is refused. "" lets the node's model-path (else the
# coordinator's model.path) decide and skips the checksum.
path = "{model_path}"
sha256 = "{sha256}"
# Run the model's own Python code (needs path and sha256). A message can never turn it on.
trust_remote_code = false
# Train a base whose layers bitsandbytes leaves (partly) in full precision, e.g. Falcon's
# FalconLinear or mixture-of-experts weights: more memory than 4-bit. Only ever from here.
allow_unquantized = false
# cpu, cuda, cuda:N or auto; "" keeps the node's device key, else auto.
device = ""

[privacy]
# Decline every round that does not train with record-level DP-SGD.
require_record_level = false
# Record-level epsilon over the whole collaboration (every run this state-dir has seen),
# counted at `delta` below; 0: no limit (a limit also requires DP-SGD).
max_epsilon = 0.0
# This institution's delta. A message asking for a larger one is trained at this one.
delta = 1e-5
# DP-SGD noise multiplier (sigma) at least this; 0: any.
min_noise_multiplier = 0.0
# A fixed noise seed makes the DP-SGD noise known to whoever knows the seed.
allow_fixed_noise_seed = false

[compute]
# Per round (0: no bound). A lora.r above max_lora_rank is trained at max_lora_rank.
max_local_steps = 0
max_batch_size = 0
max_length = 0
max_lora_rank = 0
# Rounds accepted in any 24 hours (counted from the audit trail in state-dir).
max_rounds_per_day = 0

[reply]
# Optional metrics that may leave with the update (the example count, LoRA rank and
# DP-SGD spend always go: the server's weighting and privacy ledger need them).
metrics = [{metrics}]

[fixed]
# Settings that are this institution's whatever the coordinator sends, e.g.
#   train = {{ learning_rate = 1e-4, batch_size = 8 }}
#   privacy = {{ dp_sgd_noise_multiplier = 1.2 }}
#   data = {{ columns = {{ instruction = "question", output = "answer" }} }}   # this institution's column names
# Allowed: {", ".join(FIXABLE)}
'''
