"""The institution's own audit trail: one JSON line per round it was asked to join, in its state-dir.

A row says what the institution did with a coordinator's round: the fingerprint of the
config it received, whether it accepted, declined (and on which policy key) or failed (an
error class only), the settings its policy replaced, the steps it trained, the DP-SGD it
ran, its cumulative record-level epsilon at its own delta, and the bytes and SHA-256 of the
tensors it sent. The file is append-only: each row is one ``write`` of one line, flushed and
fsynced. ``node_report`` recomputes the epsilon from the rows alone and, given the
coordinator's privacy ledger, flags each round where what the coordinator recorded for this
institution differs from what it did. No torch beyond hashing tensors; no flwr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedft.privacy.client_accountant import DpSgdRound, epsilon_of

TRAIL_FILE = "audit-trail.jsonl"
DECISIONS = ("accepted", "declined", "failed")


class TrailError(ValueError):
    """An audit trail file or row is malformed (names file:line)."""


@dataclass(frozen=True)
class TrailRow:
    """One round this institution was asked to join."""

    time: float
    run_id: int
    node_id: int
    round: int
    decision: str  # accepted | declined | failed
    config_sha256: str  # the config as the coordinator sent it
    delta: float  # the institution's delta
    epsilon: float  # cumulative record-level epsilon after this row, at ``delta``
    reason: str = ""  # declined: "policy.key: why"; failed: the error class and what the coordinator was told
    policy_key: str = ""  # declined: the rule
    overridden: dict = field(default_factory=dict)  # "section.field" -> {"asked": ..., "applied": ...}
    steps: int = 0
    dp_sgd: dict | None = None  # {"sample_rate", "noise_multiplier", "steps"} when DP-SGD ran
    bytes_sent: int = 0
    reply_sha256: str = ""
    model_sha256: str = ""

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise TrailError(f"decision = {self.decision!r} is not one of {list(DECISIONS)}")
        if self.dp_sgd is not None and sorted(self.dp_sgd) != ["noise_multiplier", "sample_rate", "steps"]:
            raise TrailError(f"dp_sgd must have sample_rate, noise_multiplier and steps, got {self.dp_sgd!r}")

    @property
    def spent(self) -> DpSgdRound | None:
        if self.decision != "accepted" or not self.dp_sgd:
            return None
        return DpSgdRound(float(self.dp_sgd["sample_rate"]), float(self.dp_sgd["noise_multiplier"]),
                          int(self.dp_sgd["steps"]))


def config_fingerprint(config_json: str) -> str:
    """SHA-256 of a config as JSON text (the message's own text, byte for byte)."""
    return hashlib.sha256(config_json.encode()).hexdigest()


def tensors_sha256(state: dict) -> str:
    """SHA-256 over tensors in name order: each name, dtype, shape and raw bytes."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensors_nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def append_row(state_dir: Path, row: TrailRow) -> Path:
    """Add ``row`` to the trail: one line in one write, flushed and fsynced (append-only)."""
    path = Path(state_dir) / TRAIL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(asdict(row), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_trail(state_dir: Path) -> list[TrailRow]:
    """Every row of the trail in ``state_dir`` (empty when there is none); errors name file:line."""
    path = Path(state_dir) / TRAIL_FILE
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(TrailRow(**json.loads(line)))
        except (json.JSONDecodeError, TypeError, TrailError) as err:
            raise TrailError(f"{path}:{number}: not an audit trail row: {err}") from None
    return rows


def spent_history(rows: list[TrailRow]) -> list[DpSgdRound]:
    return [r.spent for r in rows if r.spent is not None]


def accepted_times(rows: list[TrailRow]) -> list[float]:
    return [r.time for r in rows if r.decision == "accepted"]


def _close(a: float, b: float, tol: float = 1e-6) -> bool:
    return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)


def _ledger_flags(rows: list[TrailRow], ledger: list, run_id: int) -> list[str]:
    """Each round where the coordinator's ledger and this institution's trail disagree."""
    mine = {r.round: r for r in rows if r.run_id == run_id}
    node_ids = {r.node_id for r in mine.values()}
    flags = []
    by_round = {row.round: row for row in ledger}
    for number, trail in sorted(mine.items()):
        node = str(trail.node_id)
        entry = by_round.get(number)
        if entry is None:
            if trail.spent is not None:
                flags.append(f"round {number}: this institution ran DP-SGD and sent its update, but the "
                             "coordinator's ledger has no row for the round (its spend is not counted there)")
            continue
        charged = entry.record_level.get(node)
        refused = node in entry.refusals
        if trail.decision == "declined" and not refused:
            flags.append(f"round {number}: this institution declined ({trail.policy_key}); the ledger does "
                         "not record the refusal")
        if trail.decision != "declined" and refused:
            flags.append(f"round {number}: the ledger records a refusal; this institution {trail.decision}")
        spent = trail.spent
        if spent is None and charged and charged.get("steps", 0) > 0:
            flags.append(f"round {number}: the ledger charges DP-SGD this institution did not run "
                         f"({trail.decision})")
        elif spent is not None and not charged:
            flags.append(f"round {number}: this institution ran DP-SGD (q={spent.sample_rate:.6g}, "
                         f"sigma={spent.noise_multiplier:.6g}, {spent.steps} steps); the ledger does not charge it")
        elif spent is not None:
            for key, mine_value in (("sample_rate", spent.sample_rate), ("noise_multiplier", spent.noise_multiplier),
                                    ("steps", spent.steps)):
                if not _close(charged[key], mine_value):
                    flags.append(f"round {number}: the ledger records {key} = {charged[key]!r}; this "
                                 f"institution ran {mine_value!r}")
    for row in ledger:
        for node in node_ids:
            if row.round not in mine and str(node) in row.record_level:
                flags.append(f"round {row.round}: the ledger charges node {node}, which this institution's "
                             "trail has no round for")
    return flags


def node_report(state_dir: Path, ledger: list | None = None, run_id: int | None = None) -> dict:
    """The trail's rows, its epsilon recomputed row by row, and every disagreement found.

    ``ledger`` (the coordinator's privacy ledger rows) is compared with the trail's rows of
    ``run_id`` (default: the latest run in the trail).
    """
    rows = read_trail(state_dir)
    history: list[DpSgdRound] = []
    recomputed, mismatches = [], []
    for index, row in enumerate(rows, start=1):
        if row.spent is not None:
            history.append(row.spent)
        epsilon = epsilon_of(history, row.delta)
        recomputed.append(epsilon)
        if not _close(epsilon, row.epsilon):
            mismatches.append(f"row {index} (run {row.run_id} round {row.round}): recorded epsilon "
                              f"{row.epsilon:.6g}, recomputed {epsilon:.6g}")
    runs = [r.run_id for r in rows]
    chosen = run_id if run_id is not None else (runs[-1] if runs else None)
    flags = _ledger_flags(rows, ledger, chosen) if ledger is not None and chosen is not None else []
    delta = rows[-1].delta if rows else None
    return {
        "rows": [asdict(r) for r in rows],
        "recomputed_epsilon": recomputed,
        "epsilon": recomputed[-1] if recomputed else 0.0,
        "delta": delta,
        "run_id": chosen,
        "mismatches": mismatches,
        "ledger_flags": flags,
        "counts": {d: sum(1 for r in rows if r.decision == d) for d in DECISIONS},
    }


def print_node_report(report: dict) -> None:
    """The trail as a table, then the recomputed epsilon and each flag."""
    print(f"{'run':>6} {'round':>5}  {'decision':<9} {'steps':>5} {'q':>8} {'sigma':>7} {'epsilon':>9}  note")
    for row, epsilon in zip(report["rows"], report["recomputed_epsilon"]):
        dp = row["dp_sgd"] or {}
        note = row["policy_key"] or (row["reason"] if row["decision"] == "failed" else "")
        if row["overridden"]:
            note = (note + " " if note else "") + "replaced: " + ", ".join(sorted(row["overridden"]))
        q = f"{dp['sample_rate']:.4f}" if dp else "-"
        sigma = f"{dp['noise_multiplier']:.3f}" if dp else "-"
        print(f"{row['run_id']:>6} {row['round']:>5}  {row['decision']:<9} {row['steps']:>5} {q:>8} {sigma:>7} "
              f"{epsilon:>9.4f}  {note}")
    counts = report["counts"]
    print(f"record-level epsilon {report['epsilon']:.4f} at delta {report['delta']} "
          f"({counts['accepted']} accepted, {counts['declined']} declined, {counts['failed']} failed)")
    for line in report["mismatches"]:
        print(f"MISMATCH {line}")
    for line in report["ledger_flags"]:
        print(f"LEDGER {line}")
    if not report["mismatches"] and not report["ledger_flags"]:
        print("no disagreement found")


class TrailRecorder:
    """The trail row of one incoming round, written once it is accepted, declined or failed.

    The ClientApp fills in what it learns (state-dir, delta, the spend so far) as it goes, so a
    round that fails early is still recorded. Without a state-dir nothing is written. A
    decline or failure whose row cannot be written is logged, never raised (the reply must go).
    """

    def __init__(self, run_id: int, node_id: int, round_index: int, config_json: str) -> None:
        self.run_id, self.node_id, self.round_index = int(run_id), int(node_id), int(round_index)
        self.fingerprint = config_fingerprint(config_json)
        self.state_dir: Path | None = None
        self.delta = 1e-5
        self.history: list[DpSgdRound] = []
        self.limit_key = "privacy.client_max_epsilon"

    def _row(self, decision: str, **fields) -> TrailRow:
        return TrailRow(time=time.time(), run_id=self.run_id, node_id=self.node_id,
                        round=self.round_index, decision=decision, config_sha256=self.fingerprint,
                        delta=self.delta, epsilon=epsilon_of(self.history, self.delta), **fields)

    def _write(self, row: TrailRow) -> None:
        if self.state_dir is not None:
            append_row(self.state_dir, row)

    def _write_quietly(self, row: TrailRow) -> None:
        try:
            self._write(row)
        except Exception:  # noqa: BLE001 - the decline or failure reply must still go out
            logging.getLogger("fedft.client").error("could not append to the audit trail", exc_info=True)

    def declined(self, reason: str) -> None:
        key = reason.split(":", 1)[0]
        self._write_quietly(self._row("declined", reason=reason, policy_key=key))

    def failed(self, reason: str) -> None:
        self._write_quietly(self._row("failed", reason=reason))

    def accepted(self, overridden: dict, steps: int, dp_sgd, state: dict, model_sha256: str = "") -> None:
        """Record a trained round (raises if the row cannot be written: then nothing is sent)."""
        if dp_sgd is not None:
            self.history = self.history + [dp_sgd]
        spent = None if dp_sgd is None else {"sample_rate": dp_sgd.sample_rate,
                                             "noise_multiplier": dp_sgd.noise_multiplier, "steps": dp_sgd.steps}
        self._write(self._row("accepted", overridden=overridden, steps=int(steps), dp_sgd=spent,
                              bytes_sent=tensors_nbytes(state), reply_sha256=tensors_sha256(state),
                              model_sha256=model_sha256))
