"""The privacy ledger: one JSON line per round with every parameter an epsilon depends on.

A row records what the round did (who was sampled, who took part, who refused, the
sampling scheme, z, C, delta, each client's local DP-SGD) and the epsilons that follow.
Every epsilon can be recomputed from the recorded parameters alone (``recompute``) and
checked (``audit``), so the ledger is evidence rather than a claim. Writes are atomic
(``fedft.rundir.atomic_write_jsonl``); rounds must strictly increase. This module does
no training and imports nothing from Flower, torch or Opacus.

Conventions:
- ``noise_multiplier`` is the server's z (noise std on the sum of clipped updates / C);
  user-level events come from ``accounting.dp_fedavg_round_event`` (z / 2 for "fixed").
- User-level epsilons are None when no user-level mechanism ran in this or an earlier
  round (no user-level guarantee); "fixed" rows cannot be composed with other schemes,
  and their PLD epsilon is None (dp-accounting has no PLD for sampling without replacement).
- Record-level epsilons use RDP; a client is charged for each row in which it appears in
  ``record_level`` with steps > 0, and for nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fedft.privacy import accounting
from fedft.privacy.client_accountant import DpSgdRound, epsilon_of
from fedft.rundir import atomic_write_jsonl

USER_LEVEL = "user-dp-fedavg"
RECORD_LEVEL = "record-dp-sgd"
MECHANISMS = (USER_LEVEL, RECORD_LEVEL)
RECORD_KEYS = ("sample_rate", "noise_multiplier", "steps", "epsilon")


class LedgerError(ValueError):
    """A ledger file or row is malformed, or a row does not fit the ledger."""


@dataclass(frozen=True)
class LedgerRow:
    """One round of the privacy ledger (see the module docstring for conventions)."""

    round: int
    mechanisms: list[str]
    sampled_clients: list[str]
    participating_clients: list[str]
    num_clients: int
    sampling: str  # fixed | poisson | none
    sampling_rate: float
    noise_multiplier: float  # z of user-level DP-FedAvg (0 when it is off)
    clip_norm: float  # C of user-level DP-FedAvg (0 when it is off)
    delta: float
    epsilon_round: float | None = None  # user-level, this round alone, RDP
    epsilon_user_rdp: float | None = None  # user-level, rounds 1..round
    epsilon_user_pld: float | None = None
    record_level: dict[str, dict] = field(default_factory=dict)  # cid -> RECORD_KEYS
    clipped_fraction: float | None = None
    remaining_budget: float | None = None  # target - epsilon_user_rdp, or None
    refusals: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_row(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LedgerRow:
        """A row from its JSON object; unknown or missing keys are named in the error."""
        if not isinstance(data, dict):
            raise LedgerError(f"a ledger row must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown = sorted(set(data) - names)
        missing = sorted(required - set(data))
        if unknown or missing:
            raise LedgerError(f"ledger row has unknown keys {unknown} and misses keys {missing}")
        return cls(**data)

    @property
    def user_level(self) -> bool:
        return USER_LEVEL in self.mechanisms


def _check_row(row: LedgerRow) -> None:
    def fail(name: str, message: str) -> None:
        raise LedgerError(f"round {row.round!r}: {name} {message}")

    if isinstance(row.round, bool) or not isinstance(row.round, int) or row.round < 1:
        fail("round", f"must be an integer >= 1, got {row.round!r}")
    for name in ("mechanisms", "sampled_clients", "participating_clients", "refusals"):
        value = getattr(row, name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(name, f"must be a list of strings, got {value!r}")
    unknown = sorted(set(row.mechanisms) - set(MECHANISMS))
    if unknown:
        fail("mechanisms", f"has unknown entries {unknown}; allowed: {list(MECHANISMS)}")
    if row.sampling not in accounting.SAMPLING_SCHEMES:
        fail("sampling", f"= {row.sampling!r} is not one of {list(accounting.SAMPLING_SCHEMES)}")
    if row.user_level:
        try:
            accounting.dp_fedavg_round_event(row.num_clients, row.sampling_rate,
                                             row.noise_multiplier, row.sampling)
        except ValueError as error:
            raise LedgerError(f"round {row.round}: {error}") from None
        if isinstance(row.clip_norm, bool) or not isinstance(row.clip_norm, (int, float)) or row.clip_norm <= 0:
            fail("clip_norm", f"must be > 0 with {USER_LEVEL} on, got {row.clip_norm!r}")
    if isinstance(row.delta, bool) or not isinstance(row.delta, (int, float)) or not 0 < row.delta < 1:
        fail("delta", f"must be a number in (0, 1), got {row.delta!r}")
    if row.user_level and row.sampling == "fixed" and len(row.sampled_clients) != round(
            row.sampling_rate * row.num_clients):
        fail("sampled_clients", f"has {len(row.sampled_clients)} ids but fixed-size sampling at "
             f"sampling_rate {row.sampling_rate} of {row.num_clients} clients samples "
             f"{round(row.sampling_rate * row.num_clients)}")
    if not isinstance(row.record_level, dict):
        fail("record_level", f"must be an object client id -> parameters, got {row.record_level!r}")
    for cid, entry in row.record_level.items():
        if not isinstance(entry, dict) or sorted(entry) != sorted(RECORD_KEYS):
            fail(f"record_level[{cid!r}]", f"must have exactly the keys {list(RECORD_KEYS)}, got {entry!r}")
        steps = entry["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            fail(f"record_level[{cid!r}].steps", f"must be an integer >= 0, got {steps!r}")
        if steps > 0:
            try:
                accounting.record_level_round_event(entry["sample_rate"], entry["noise_multiplier"], steps)
            except ValueError as error:
                fail(f"record_level[{cid!r}]", str(error))
        if entry["epsilon"] is not None and not isinstance(entry["epsilon"], (int, float)):
            fail(f"record_level[{cid!r}].epsilon", f"must be a number or null, got {entry['epsilon']!r}")


# --- file I/O -------------------------------------------------------------------------------

def read_ledger(path: Path) -> list[LedgerRow]:
    """All rows of a ledger file (empty if it does not exist); errors name file:line."""
    path = Path(path)
    if not path.exists():
        return []
    rows, numbers = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(LedgerRow.from_dict(json.loads(line)))
            numbers.append(number)
        except json.JSONDecodeError as error:
            raise LedgerError(f"{path}:{number}: not valid JSON ({error.msg} at column "
                              f"{error.colno})") from None
        except (LedgerError, TypeError) as error:
            raise LedgerError(f"{path}:{number}: {error}") from None
    for previous, row, number in zip(rows, rows[1:], numbers[1:]):
        if row.round <= previous.round:
            raise LedgerError(f"{path}:{number}: round {row.round} follows round {previous.round}; "
                              "rounds must strictly increase")
    return rows


def append_row(path: Path, row: LedgerRow) -> None:
    """Add ``row`` after the existing rows and rewrite the file atomically."""
    if not isinstance(row, LedgerRow):
        raise TypeError(f"row must be a LedgerRow, got {type(row).__name__}")
    rows = read_ledger(path)
    if any(r.round == row.round for r in rows):
        raise LedgerError(f"{path}: round {row.round} is already in the ledger; "
                          "a round is recorded once")
    if rows and row.round < rows[-1].round:
        raise LedgerError(f"{path}: round {row.round} comes after round {rows[-1].round}; "
                          "rows must be appended in round order")
    atomic_write_jsonl(Path(path), [r.to_dict() for r in rows + [row]])


# --- recomputation --------------------------------------------------------------------------

def _user_event(row: LedgerRow):
    return accounting.dp_fedavg_round_event(row.num_clients, row.sampling_rate,
                                            row.noise_multiplier, row.sampling)


def _user_epsilons(rows: list[LedgerRow], delta: float, *,
                   pld_discretization: float) -> tuple[float | None, float | None]:
    """Cumulative user-level (RDP, PLD) epsilons over ``rows``; None without a guarantee."""
    if not rows or not all(r.user_level for r in rows):
        return None, None
    events = [(_user_event(r), 1) for r in rows]
    try:
        eps_rdp = accounting.epsilon(events, delta, "rdp")
        eps_pld = accounting.epsilon(events, delta, "pld", pld_discretization=pld_discretization)
    except ValueError as error:
        raise LedgerError(f"rounds {rows[0].round}..{rows[-1].round}: {error}") from None
    return eps_rdp, eps_pld


def _record_epsilon(rows: list[LedgerRow], client: str, delta: float) -> float:
    """Cumulative record-level RDP epsilon of ``client`` over the rows that charge it (as its accountant does)."""
    history = [DpSgdRound(e["sample_rate"], e["noise_multiplier"], e["steps"])
               for e in (row.record_level.get(client) for row in rows) if e is not None]
    return epsilon_of(history, delta)


def epsilons_for(previous: list[LedgerRow], row: LedgerRow, target_epsilon: float | None = None, *,
                 pld_discretization: float = accounting.PLD_VALUE_DISCRETIZATION) -> dict:
    """Every epsilon field of ``row`` given the rows before it, computed from parameters.

    Returns a dict with ``epsilon_round``, ``epsilon_user_rdp``, ``epsilon_user_pld``,
    ``remaining_budget`` and ``record_level`` (client id -> cumulative epsilon).
    """
    history = list(previous) + [row]
    eps_rdp, eps_pld = _user_epsilons(history, row.delta, pld_discretization=pld_discretization)
    eps_round = (accounting.epsilon([(_user_event(row), 1)], row.delta, "rdp")
                 if row.user_level else None)
    remaining = None
    if target_epsilon is not None and eps_rdp is not None:
        remaining = target_epsilon - eps_rdp
    record = {cid: _record_epsilon(history, cid, row.delta) for cid in row.record_level}
    return {"epsilon_round": eps_round, "epsilon_user_rdp": eps_rdp, "epsilon_user_pld": eps_pld,
            "remaining_budget": remaining, "record_level": record}


def with_epsilons(previous: list[LedgerRow], row: LedgerRow, target_epsilon: float | None = None, *,
                  pld_discretization: float = accounting.PLD_VALUE_DISCRETIZATION) -> LedgerRow:
    """``row`` with every epsilon field filled in by ``epsilons_for`` (what the server appends)."""
    eps = epsilons_for(previous, row, target_epsilon, pld_discretization=pld_discretization)
    record = {cid: {**entry, "epsilon": eps["record_level"][cid]}
              for cid, entry in row.record_level.items()}
    return dataclasses.replace(row, epsilon_round=eps["epsilon_round"],
                               epsilon_user_rdp=eps["epsilon_user_rdp"],
                               epsilon_user_pld=eps["epsilon_user_pld"],
                               remaining_budget=eps["remaining_budget"], record_level=record)


def recompute(rows: list[LedgerRow], target_epsilon: float | None = None, *,
              pld_discretization: float = accounting.PLD_VALUE_DISCRETIZATION) -> list[dict]:
    """Every row's epsilons recomputed from the recorded parameters (``epsilons_for`` per row).

    Each dict also carries ``round``. One PLD evaluation per row (about 0.5 s at the default
    discretization), so a long ledger takes a while.
    """
    return [{"round": row.round, **epsilons_for(rows[:i], row, target_epsilon,
                                                pld_discretization=pld_discretization)}
            for i, row in enumerate(rows)]


class Mismatch(NamedTuple):
    """A recorded value that recomputation does not reproduce."""

    round: int
    field: str
    recorded: float | None
    recomputed: float | None

    def __str__(self) -> str:
        return (f"round {self.round}: {self.field} recorded {self.recorded!r}, "
                f"recomputed {self.recomputed!r}")


def _differs(recorded, recomputed, tol: float) -> bool:
    if recorded is None or recomputed is None:
        return (recorded is None) != (recomputed is None)
    if math.isinf(recorded) or math.isinf(recomputed):
        return recorded != recomputed
    return abs(recorded - recomputed) > tol


def audit(rows: list[LedgerRow], tol: float = 1e-6, target_epsilon: float | None = None, *,
          pld_discretization: float = accounting.PLD_VALUE_DISCRETIZATION) -> list[Mismatch]:
    """Recorded epsilons that differ from their recomputation by more than ``tol``.

    ``remaining_budget`` is checked only when ``target_epsilon`` is given.
    """
    mismatches = []
    fields = ["epsilon_round", "epsilon_user_rdp", "epsilon_user_pld"]
    if target_epsilon is not None:
        fields.append("remaining_budget")
    for row, fresh in zip(rows, recompute(rows, target_epsilon, pld_discretization=pld_discretization)):
        for name in fields:
            if _differs(getattr(row, name), fresh[name], tol):
                mismatches.append(Mismatch(row.round, name, getattr(row, name), fresh[name]))
        for cid, entry in row.record_level.items():
            if _differs(entry["epsilon"], fresh["record_level"][cid], tol):
                mismatches.append(Mismatch(row.round, f"record_level[{cid}].epsilon",
                                           entry["epsilon"], fresh["record_level"][cid]))
    return mismatches


def next_user_epsilon(rows: list[LedgerRow], *, num_clients: int, sampling_rate: float,
                      noise_multiplier: float, sampling: str, delta: float) -> float:
    """Cumulative user-level RDP epsilon if one more round with these parameters ran.

    Call it before a round and skip the round if the answer exceeds the target. Returns
    ``math.inf`` if an earlier row ran without user-level DP (there is no guarantee left).
    """
    if any(not r.user_level for r in rows):
        return math.inf
    events = [(_user_event(r), 1) for r in rows]
    events.append((accounting.dp_fedavg_round_event(num_clients, sampling_rate,
                                                    noise_multiplier, sampling), 1))
    return accounting.epsilon(events, delta, "rdp")
