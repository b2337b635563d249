"""The server's privacy bookkeeping for one run: budget checks before a round, a ledger row after.

``PrivacyBookkeeper`` owns ``RUN_DIR/privacy_ledger.jsonl``. Before each round it asks
whether the round would push the cumulative user-level epsilon (RDP) past
``privacy.target_epsilon`` and, if so, says why the run stops; after each round it appends
the row (who was sampled, who replied, q = m / N, z, C, delta, the clipped share, every
epsilon) through ``fedft.privacy.ledger``, atomically. Client sampling is Flower's: a
fixed-size sample without replacement, accounted with replace-one neighbours. No flwr.
"""

from __future__ import annotations

from pathlib import Path

from fedft.config import PrivacyConfig
from fedft.privacy.ledger import RECORD_LEVEL, USER_LEVEL, LedgerRow, next_user_epsilon, with_epsilons
from fedft.rundir import atomic_write_jsonl

LEDGER_FILE = "privacy_ledger.jsonl"


class PrivacyRunError(RuntimeError):
    """The run directory or the round cannot be accounted for honestly."""


class PrivacyBookkeeper:
    """Budget checks and ledger rows for one DP-FedAvg run."""

    def __init__(self, cfg: PrivacyConfig, ledger_path: Path, resume_rows: list[dict] | None = None) -> None:
        """A fresh ledger, or (``resume_rows``) the ledger as of the checkpoint a run resumes from.

        On resume the ledger file is rewritten from the checkpoint's copy: a row written for a
        round whose checkpoint never completed is dropped, because that round runs again.
        """
        self.cfg = cfg
        self.path = Path(ledger_path)
        self.stopped_by_budget: str | None = None
        if resume_rows is None:
            if self.path.exists():
                raise PrivacyRunError(
                    f"{self.path} already exists: a new run here would mix two runs' privacy "
                    "accounting; resume it (--resume), choose a new --out directory or remove the old run")
            self.rows: list[LedgerRow] = []
        else:
            self.rows = [LedgerRow.from_dict(r) for r in resume_rows]
            self.flush()

    @property
    def target(self) -> float | None:
        return (self.cfg.target_epsilon or None) if self.cfg.user_level else None

    @property
    def sampling(self) -> str:
        """How clients were sampled: Flower's fixed-size sample, or Poisson with rate q."""
        return self.cfg.client_sampling

    def _rate(self, sample_size: int, num_clients: int) -> float:
        return self.cfg.client_sampling_rate if self.sampling == "poisson" else sample_size / num_clients

    @property
    def mechanisms(self) -> list[str]:
        return ([USER_LEVEL] if self.cfg.user_level else []) + ([RECORD_LEVEL] if self.cfg.record_level else [])

    def refuse_round(self, round_index: int, num_clients: int, sample_size: int) -> str | None:
        """A message if running ``round_index`` would exceed the budget, else None."""
        if self.target is None:
            return None
        projected = next_user_epsilon(
            self.rows, num_clients=num_clients, sampling_rate=self._rate(sample_size, num_clients),
            noise_multiplier=self.cfg.noise_multiplier, sampling=self.sampling, delta=self.cfg.delta)
        if projected <= self.target:
            return None
        spent = self.rows[-1].epsilon_user_rdp if self.rows else 0.0
        self.stopped_by_budget = (
            f"privacy budget: round {round_index} would bring the user-level epsilon to "
            f"{projected:.3f} > privacy.target_epsilon = {self.target:g} (delta {self.cfg.delta:g}); "
            f"stopping after round {round_index - 1} with epsilon {spent:.3f}")
        return self.stopped_by_budget

    def record_round(self, round_index: int, sampled: list[int], replied: list[int], num_clients: int,
                     clipped_fraction: float | None, record_level: dict[int, dict] | None = None,
                     refusals: list[int] | None = None) -> LedgerRow:
        """Add this round's ledger row (epsilons computed from its parameters) and return it.

        ``record_level`` maps each client whose DP-SGD update reached the server to what it
        spent (sample_rate, noise_multiplier, steps); ``refusals`` are clients that declined.
        """
        user = self.cfg.user_level
        row = LedgerRow(
            round=round_index, mechanisms=self.mechanisms,
            sampled_clients=sorted(str(n) for n in sampled),
            participating_clients=sorted(str(n) for n in replied),
            num_clients=num_clients, sampling=self.sampling,
            sampling_rate=self._rate(len(sampled), num_clients),
            noise_multiplier=self.cfg.noise_multiplier if user else 0.0,
            clip_norm=self.cfg.clip_norm if user else 0.0,
            delta=self.cfg.delta, clipped_fraction=clipped_fraction if user else None,
            record_level={str(n): {**spent, "epsilon": None} for n, spent in (record_level or {}).items()},
            refusals=sorted(str(n) for n in refusals or []),
        )
        row = with_epsilons(self.rows, row, self.target)
        self.rows.append(row)
        return row

    def flush(self) -> None:
        """Rewrite the ledger file with every row so far (atomically); call after the checkpoint."""
        atomic_write_jsonl(self.path, [r.to_dict() for r in self.rows])

    def summary(self) -> dict:
        """What summary.json says about privacy."""
        last = self.rows[-1] if self.rows else None
        record = last.record_level if last else {}
        return {
            "mechanisms": self.mechanisms, "clip_norm": self.cfg.clip_norm,
            "noise_multiplier": self.cfg.noise_multiplier, "delta": self.cfg.delta,
            "target_epsilon": self.target, "rounds_accounted": len(self.rows),
            "epsilon_user_rdp": last.epsilon_user_rdp if last else 0.0,
            "epsilon_user_pld": last.epsilon_user_pld if last else None,
            "stopped_by_budget": self.stopped_by_budget,
            "record_level_max_epsilon": max((e["epsilon"] for e in record.values()), default=None),
            "refusals": sum(len(r.refusals) for r in self.rows),
        }
