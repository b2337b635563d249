"""The one run loop: round 0, the rounds, evaluation, checkpoints, summary, final stages, report.

Federated training (``server/federation.py``, over Flower's Grid), the centralized baseline
and the local-only baseline (``fedft.run.baselines``) differ only in how one round trains:
each is a ``Rounds`` object. Everything a run records is done here, once: the base model's
row 0, a metrics row per round, the privacy ledger, the held-out evaluation every
``strategy.eval_every`` rounds, a resumable checkpoint per round, summary.json, curves.png,
then the final stages (DPO, the evaluation of every stage) and report.md. Nothing here
imports flwr.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedft.config import FedftConfig
from fedft.privacy.bookkeeping import LEDGER_FILE, PrivacyBookkeeper
from fedft.report.plots import prefetch_pyplot
from fedft.run.final_stages import run_final_stages, write_report
from fedft.run.recorder import RunRecorder, format_progress, summarize
from fedft.run.resume import ResumePoint, checkpoint_extras, load_resume_point
from fedft.rundir import (
    ADAPTER_DIR,
    CANARY_AUDIT_FILE,
    FAILURE_FILE,
    atomic_write_json,
    checkpoint_dir,
    record_failure,
)


@dataclass(frozen=True)
class RoundPrivacy:
    """What the privacy ledger records of a round: who was asked, who replied, what they spent."""

    sampled: list[int]
    replied: list[int]
    clipped_fraction: float | None = None
    record_level: dict[int, dict] = field(default_factory=dict)  # node -> the DP-SGD it spent
    refusals: list[int] = field(default_factory=list)  # nodes that declined the round


@dataclass(frozen=True)
class RoundResult:
    """One trained round: the new state and what it adds to the round's metrics row."""

    state: Any
    row: dict
    privacy: RoundPrivacy | None = None
    notes: tuple[str, ...] = ()  # lines shown after the round's progress line


class StopRun(Exception):
    """A round cannot run and the run ends after the previous one (not an error: e.g. every
    remaining client declined at its privacy limit). The message says why; ``declines`` are the
    clients' own reasons ("node N: fedft-declined: key: why"), kept in summary.json."""

    def __init__(self, message: str, declines: list[str] | None = None) -> None:
        super().__init__(message)
        self.declines = list(declines or [])


class Rounds(Protocol):
    """How one kind of run trains a round; the loop does everything else."""

    stage: str  # the stage name the trained state gets in the evaluation: federated, centralized, local
    resumable: bool  # checkpoints are written (and --resume works) for a single global adapter

    def headline(self, state) -> str: ...
    def start(self, first_round: int) -> None: ...
    def population(self) -> tuple[int, int]: ...  # (clients available, clients a round samples)
    def train(self, round_index: int, state) -> RoundResult: ...
    def evaluate(self, state) -> dict: ...
    def save(self, state, directory: Path, extras: dict | None = None, *, model_card: bool = True) -> None: ...
    def optimizer_state(self) -> dict: ...
    def restore_optimizer(self, saved: dict) -> None: ...


def should_evaluate(round_index: int, num_rounds: int, every: int) -> bool:
    """The held-out schedule: every ``every`` rounds (0: never) and always the last round."""
    return round_index == num_rounds or (every > 0 and round_index % every == 0)


def eval_columns(metrics: dict) -> dict:
    """The held-out metrics a row records (an evaluation less its sample answers)."""
    return {k: v for k, v in metrics.items() if k.startswith("eval_")}


def eta_text(seconds: list[float], remaining: int) -> str:
    """'ETA 3m05s' from the mean time of the rounds run so far."""
    if not seconds or remaining <= 0:
        return ""
    total = round(sum(seconds) / len(seconds) * remaining)
    return f"ETA {total // 60}m{total % 60:02d}s"


def ledger_columns(ledger_row) -> dict:
    """The privacy columns of a metrics row, from the ledger's row for the same round."""
    return {"epsilon_user_rdp": ledger_row.epsilon_user_rdp,
            "epsilon_user_pld": ledger_row.epsilon_user_pld,
            "clipped_fraction": ledger_row.clipped_fraction,
            "epsilon_record_max": max((e["epsilon"] for e in ledger_row.record_level.values()), default=None),
            "refusals": ledger_row.refusals}


class RunLoop:
    """One run directory's rounds, from the base model (or a checkpoint) to the report."""

    def __init__(self, cfg: FedftConfig, out_dir: Path, rounds: Rounds, *, resume: bool = False,
                 progress: Callable[[str], None] = print) -> None:
        self.cfg, self.out_dir, self.rounds, self.progress = cfg, Path(out_dir), rounds, progress
        self.recorder = RunRecorder(self.out_dir)
        self.point: ResumePoint | None = load_resume_point(self.out_dir, cfg) if resume else None
        accounted = cfg.privacy.user_level or cfg.privacy.record_level
        resume_rows = None if self.point is None else self.point.ledger_rows or []
        self.privacy = (PrivacyBookkeeper(cfg.privacy, self.out_dir / LEDGER_FILE, resume_rows)
                        if accounted else None)
        self.stopped: dict | None = None  # the round that could not run, and why (StopRun)
        self.base_metrics: dict = {}  # round 0's evaluation (with its answers), unless resumed

    def run(self, initial_state) -> dict:
        """Every round, then the summary, the final stages and the report; returns summary.json.

        An error that ends the run is recorded in RUN_DIR/failed.json (class and message, for
        ``fedft status``) before it is raised; a run that finishes removes a stale one.
        """
        try:
            summary = self._run(initial_state)
        except Exception as error:
            record_failure(self.out_dir, type(error).__name__, str(error))
            raise
        (self.out_dir / FAILURE_FILE).unlink(missing_ok=True)
        return summary

    def _run(self, initial_state) -> dict:
        started = time.time()
        state, first_round = self._start(initial_state)
        final_metrics, evaluated, state, completed = self._rounds(state, first_round)
        if completed and evaluated != completed:  # stopped early (a privacy budget, declined clients)
            final_metrics = self.rounds.evaluate(state)
            self.recorder.amend_last(eval_columns(final_metrics))
        self.rounds.save(state, self.out_dir / ADAPTER_DIR)
        summary = self._summary(state, final_metrics, time.time() - started)
        scored = {"base": self.base_metrics, self.rounds.stage: final_metrics}
        added = run_final_stages(self.cfg, self.out_dir, self.rounds.stage, state, self.progress, scored=scored)
        if added:
            summary.update(added)
            self.recorder.write_summary(summary)
        write_report(self.out_dir, self.progress)
        return summary

    def _start(self, initial_state) -> tuple[Any, int]:
        point, rounds = self.point, self.rounds
        state, first_round = (initial_state, 1) if point is None else (point.state, point.round + 1)
        if point is not None:
            rounds.restore_optimizer(point.optimizer_state)
        rounds.start(first_round)
        self.progress(rounds.headline(state))
        from fedft.data.prompt_format import prompt_format_line
        from fedft.model.load import cached_model_facts, model_spec

        self.model_facts = cached_model_facts(model_spec(self.cfg))
        self.progress(f"model: {self.model_facts['quantization_line']}")
        self.progress(prompt_format_line(self.model_facts["prompt_format"]))
        return state, first_round

    def _round_zero(self, state) -> tuple[dict, int]:
        """The base model's row (round 0), or the rows of the checkpoint resumed from."""
        if self.point is not None:
            for row in self.point.metrics_rows:
                self.recorder.add_round(row)
            evaluated = max(r["round"] for r in self.point.metrics_rows if "eval_loss" in r)
            self.progress(f"resuming after round {self.point.round} from {self.point.path}")
            return eval_columns(self.point.metrics_rows[evaluated]), evaluated
        t0 = time.time()
        metrics = self.base_metrics = self.rounds.evaluate(state)
        row = {"round": 0, "train_loss": None, "bytes_up": 0, "bytes_down": 0, "clients": 0,
               "seconds": time.time() - t0, **eval_columns(metrics)}
        self.recorder.add_round(row)
        self.progress(format_progress(row, self.cfg.strategy.num_rounds) + "  (base model)")
        return metrics, 0

    def _rounds(self, state, first_round: int) -> tuple[dict, int, Any, int]:
        final_metrics, evaluated = self._round_zero(state)
        num_rounds, completed, took = self.cfg.strategy.num_rounds, first_round - 1, []
        for round_index in range(first_round, num_rounds + 1):
            t0 = time.time()
            try:
                result, num_clients = self._train(round_index, state)
            except StopRun as stop:
                self.progress(str(stop))
                for decline in stop.declines:
                    self.progress(f"  {decline}")
                self.stopped = {"round": round_index, "reason": str(stop), "declines": stop.declines}
                break
            state, completed = result.state, round_index
            row = {"round": round_index, **result.row}
            if self.privacy is not None and result.privacy is not None:
                p = result.privacy
                row.update(ledger_columns(self.privacy.record_round(
                    round_index, p.sampled, p.replied, num_clients, p.clipped_fraction, p.record_level,
                    p.refusals)))
            if should_evaluate(round_index, num_rounds, self.cfg.strategy.eval_every):
                final_metrics, evaluated = self.rounds.evaluate(state), round_index
                row.update(eval_columns(final_metrics))
            row["seconds"] = time.time() - t0
            self._record(round_index, state, row)
            took.append(row["seconds"])
            if round_index == first_round:
                prefetch_pyplot()
            eta = eta_text(took, num_rounds - round_index)
            self.progress(format_progress(row, num_rounds) + (f"  {eta}" if eta else ""))
            for note in result.notes:
                self.progress(note)
        return final_metrics, evaluated, state, completed

    def _train(self, round_index: int, state) -> tuple[RoundResult, int]:
        """The round's training, unless the privacy budget refuses it (then ``StopRun``)."""
        num_clients, sample_size = self.rounds.population()
        if self.privacy is not None:
            refusal = self.privacy.refuse_round(round_index, num_clients, sample_size)
            if refusal:
                raise StopRun(refusal)
        return self.rounds.train(round_index, state), num_clients

    def _record(self, round_index: int, state, row: dict) -> None:
        """The round's checkpoint (complete or absent), then its metrics row and ledger row."""
        if self.rounds.resumable:
            ledger_rows = [r.to_dict() for r in self.privacy.rows] if self.privacy is not None else None
            extras = checkpoint_extras(round_index, self.cfg, self.recorder.rows + [row], ledger_rows,
                                       self.rounds.optimizer_state())
            self.rounds.save(state, checkpoint_dir(self.out_dir, round_index), extras, model_card=False)
        self.recorder.add_round(row)
        if self.privacy is not None:
            self.privacy.flush()

    def _summary(self, state, final_metrics: dict, wall_seconds: float) -> dict:
        cfg = self.cfg
        canary_audit = self._canary_audit() if cfg.privacy.canaries else None
        self.recorder.plot(f"fedft {cfg.strategy.name}: {cfg.simulation.num_supernodes} clients")
        summary = summarize(cfg, self.recorder.rows, final_metrics, wall_seconds)
        if self.privacy is not None:
            summary["privacy"] = self.privacy.summary()
        if canary_audit is not None:
            summary["canary_audit"] = canary_audit
        if self.stopped is not None:
            summary["stopped"] = self.stopped
        summary["model"] = {"quantization": self.model_facts["quantization"],
                            "prompt_format": self.model_facts["prompt_format"]}
        self.recorder.write_summary(summary)
        final = summary["final"]
        self.progress(f"{self.rounds.stage} rounds done in {summary['wall_seconds']:.0f}s: exact match "
                      f"{100 * final['eval_exact_match']:.1f}% (base "
                      f"{100 * summary['base']['eval_exact_match']:.1f}%); adapter in {self.out_dir / ADAPTER_DIR}")
        return summary

    def _canary_audit(self) -> dict:
        """The empirical privacy audit of the trained adapter (simulation only; it holds the last state)."""
        from fedft.model.load import cached_peft_model, model_spec
        from fedft.privacy.canaries import audit_canaries

        self.progress(f"canary audit: scoring {self.cfg.privacy.canaries} canaries against random secrets ...")
        model, tokenizer = cached_peft_model(model_spec(self.cfg))
        audit = audit_canaries(self.cfg.privacy, model, tokenizer, seed=self.cfg.seed,
                               max_length=self.cfg.data.max_length)
        atomic_write_json(self.out_dir / CANARY_AUDIT_FILE, audit)
        formal = self.privacy.summary().get("epsilon_user_rdp") if self.privacy is not None else None
        self.progress(canary_line(audit, formal))
        return audit


def canary_line(audit: dict, formal_epsilon: float | None) -> str:
    """The canary audit's console line: guesses, the empirical lower bound, the formal epsilon."""
    formal = "-" if formal_epsilon is None else f"{formal_epsilon:.2f}"
    return (f"canary audit: {audit['correct_guesses']} of {audit['guesses']} membership guesses right; "
            f"empirical epsilon >= {audit['epsilon_lower_bound']:.2f} at {audit['significance']:.0%} "
            f"significance (a lower bound; formal user-level epsilon {formal}); mean exposure "
            f"{audit['mean_exposure_bits'] or 0:.2f} of {audit['max_possible_exposure_bits']:.0f} bits")
