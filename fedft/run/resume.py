"""Checkpoints a run can resume from: what each one holds and how to read it back.

Every round the server writes ``RUN_DIR/checkpoints/round-NNN/`` in one rename (see
``fedft.model.save_adapter``): the adapter in PEFT format plus ``round.json``, the config
(``fedft_config.json``), the metrics rows so far, the privacy ledger so far and the
server optimizer's moments. A checkpoint is therefore complete or absent, and the latest
one is a consistent state of the whole run: resuming from it re-runs only the rounds after
it, so the ledger holds each round exactly once. No flwr.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fedft.config import ConfigError, FedftConfig, config_to_dict
from fedft.rundir import ADAPTER_WEIGHTS, CHECKPOINT_META, jsonl_text, latest_checkpoint, read_jsonl_rows

CONFIG_FILE = "fedft_config.json"
METRICS_COPY = "metrics.jsonl"
LEDGER_COPY = "privacy_ledger.jsonl"
OPTIMIZER_FILE = "server_optimizer.safetensors"


def checkpoint_extras(round_index: int, cfg: FedftConfig, metrics_rows: list[dict],
                      ledger_rows: list[dict] | None, optimizer_state: dict[str, torch.Tensor]) -> dict:
    """The files (name -> bytes) that make a round's adapter directory a resumable checkpoint."""
    from safetensors.torch import save

    extras = {
        CHECKPOINT_META: json.dumps({"round": round_index}).encode(),
        CONFIG_FILE: json.dumps(config_to_dict(cfg), sort_keys=True, indent=1).encode(),
        METRICS_COPY: jsonl_text(metrics_rows).encode(),
    }
    if ledger_rows is not None:
        extras[LEDGER_COPY] = jsonl_text(ledger_rows).encode()
    if optimizer_state:
        extras[OPTIMIZER_FILE] = save({k: v.contiguous() for k, v in optimizer_state.items()})
    return extras


@dataclass(frozen=True)
class ResumePoint:
    """The state of a run after its last complete checkpoint."""

    round: int
    state: dict[str, torch.Tensor]
    metrics_rows: list[dict]
    ledger_rows: list[dict] | None
    optimizer_state: dict[str, torch.Tensor]
    path: Path


POST_FEDERATION_SECTIONS = ("dpo", "report")  # may change between a run and its resumption


def _config_differences(saved: dict, current: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Fields that differ, section by section; a field the checkpoint predates counts as its
    default (a newer fedft added it), so upgrading fedft does not by itself refuse a resume."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, defaults.get(key)), current.get(key)
        if not prefix and isinstance(b, dict):  # a section
            out += _config_differences(a or {}, b, defaults.get(key) or {}, f"{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def load_resume_point(run_dir: Path, cfg: FedftConfig) -> ResumePoint:
    """Read the latest checkpoint; refuse one written under a different config."""
    from safetensors.torch import load, load_file

    path = latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint (checkpoints/round-NNN/{CHECKPOINT_META}) "
                                "to resume from")
    round_index = int(json.loads((path / CHECKPOINT_META).read_text())["round"])
    saved = json.loads((path / CONFIG_FILE).read_text())
    current = config_to_dict(cfg)
    for after_the_rounds in POST_FEDERATION_SECTIONS:  # do not change what the rounds compute
        saved.pop(after_the_rounds, None)
        current.pop(after_the_rounds, None)
    differences = _config_differences(saved, current, config_to_dict(FedftConfig()))
    if differences:
        raise ConfigError(f"cannot resume {run_dir} from {path.name}: the config differs: "
                          + "; ".join(differences[:5]))
    rows = read_jsonl_rows(path / METRICS_COPY)
    if [r["round"] for r in rows] != list(range(round_index + 1)):
        raise ValueError(f"{path / METRICS_COPY} does not hold rounds 0..{round_index}")
    ledger = None
    if (path / LEDGER_COPY).exists():
        ledger = read_jsonl_rows(path / LEDGER_COPY)
    optimizer = load((path / OPTIMIZER_FILE).read_bytes()) if (path / OPTIMIZER_FILE).exists() else {}
    state = {k: v.to(torch.float32) for k, v in load_file(path / ADAPTER_WEIGHTS).items()}
    return ResumePoint(round_index, dict(sorted(state.items())), rows, ledger, optimizer, path)
