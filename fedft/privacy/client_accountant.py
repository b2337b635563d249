"""One client's record-level privacy accountant: its DP-SGD history, its epsilon, its file.

Like Opacus' ``IAccountant``, an accountant is a small history of (sample rate, noise
multiplier, steps), one entry per DP-SGD round the client ran, with ``epsilon(delta)`` and
save/load. The ClientApp loads it from the institution's state file, checks the planned
round against the institution's limit (``check``: declining is ``ClientDeclined``), and
saves it with the round it spent; the server's ledger charges each client with the same
arithmetic (``epsilon_of``). Accounting only: no torch, no training, no flwr.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedft.privacy import accounting
from fedft.rundir import atomic_write_json

HISTORY_KEYS = ("sample_rate", "noise_multiplier", "steps")


@dataclass(frozen=True)
class DpSgdRound:
    """What a DP-SGD round spent, as the ledger records it."""

    sample_rate: float
    noise_multiplier: float
    steps: int


class ClientDeclined(Exception):
    """The client refuses this round (its record-level privacy limit would be exceeded)."""


def epsilon_of(history: Iterable[DpSgdRound], delta: float) -> float:
    """The cumulative record-level epsilon (RDP) of a DP-SGD history."""
    events = [(accounting.record_level_round_event(h.sample_rate, h.noise_multiplier, h.steps), 1)
              for h in history if h.steps > 0]
    return accounting.epsilon(events, delta, "rdp") if events else 0.0


class RecordLevelAccountant:
    """The DP-SGD rounds one client ran, across runs when it keeps them in a file."""

    def __init__(self, history: Iterable[DpSgdRound] = ()) -> None:
        self.history: list[DpSgdRound] = list(history)

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history, delta)

    def check(self, planned: DpSgdRound, delta: float, limit: float | None) -> None:
        """Raise ``ClientDeclined`` if ``planned`` would take this client past ``limit`` (None/0: no limit)."""
        if not limit:
            return
        projected = epsilon_of(self.history + [planned], delta)
        if projected > limit:
            raise ClientDeclined(
                f"one more round would bring this client's record-level epsilon to {projected:.3f} > "
                f"its limit {limit:g} (spent {self.epsilon(delta):.3f})")

    def step(self, spent: DpSgdRound) -> None:
        """Record a round the client ran."""
        self.history.append(spent)

    def to_record(self) -> dict[str, list]:
        """Column lists, as the state file and Flower's node state hold them."""
        return {key: [getattr(h, key) for h in self.history] for key in HISTORY_KEYS}

    @classmethod
    def from_record(cls, record) -> RecordLevelAccountant:
        columns = [record[key] for key in HISTORY_KEYS]
        return cls(DpSgdRound(float(q), float(z), int(n)) for q, z, n in zip(*columns))

    def save(self, path: Path) -> None:
        """Write the history atomically (the institution's own file; nothing of it leaves)."""
        atomic_write_json(Path(path), self.to_record())

    @classmethod
    def load(cls, path: Path) -> RecordLevelAccountant:
        """The history in ``path``, or an empty one when the file does not exist yet."""
        path = Path(path)
        return cls.from_record(json.loads(path.read_text())) if path.exists() else cls()
