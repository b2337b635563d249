"""Baselines that put a number on the value of federation, run through the same run loop.

``local``: every client trains alone on its own partition for all rounds (no averaging);
each client's adapter is scored on the pooled held-out set and the run reports their mean.
``centralized``: one trainer on the pooled training data with the same total number of
optimizer steps as the federation (rounds x local steps x clients per round). Both are
``Rounds`` of ``fedft.run.loop``, so they write what a federated run writes (metrics.jsonl,
summary.json, adapter/, curves.png) and get the same final stages and report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

from fedft.config import FedftConfig
from fedft.data.partition import cached_partitions
from fedft.data.rows import load_row_files, tokenize_dataset
from fedft.eval.held_out import ANSWERS, HeldOutEvaluator
from fedft.federated.client_round import client_seed
from fedft.model.adapter import save_adapter
from fedft.run.loop import RoundResult, RunLoop
from fedft.train.local import train_local


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def clients_per_round(cfg: FedftConfig) -> int:
    """How many clients a federated round of this config trains (its steps set the baseline's)."""
    return max(cfg.strategy.min_train_nodes, math.floor(cfg.simulation.num_supernodes * cfg.strategy.fraction_train))


class _InProcessRounds:
    """What both baselines share: the cached model, no server optimizer, no privacy sampling."""

    def __init__(self, cfg: FedftConfig, evaluator: HeldOutEvaluator) -> None:
        self.cfg, self.evaluator = cfg, evaluator
        self.model, self.tokenizer = evaluator.model, evaluator.tokenizer

    def start(self, first_round: int) -> None:
        pass

    def population(self) -> tuple[int, int]:
        return self.cfg.simulation.num_supernodes, clients_per_round(self.cfg)

    def optimizer_state(self) -> dict:
        return {}

    def restore_optimizer(self, saved: dict) -> None:
        pass


class CentralizedRounds(_InProcessRounds):
    """One trainer on the pooled data, as many optimizer steps per round as a federated round."""

    stage, resumable = "centralized", True

    def __init__(self, cfg: FedftConfig, evaluator: HeldOutEvaluator) -> None:
        super().__init__(cfg, evaluator)
        rows = load_row_files(cfg.data.train_files, cfg.data.columns)
        self.examples = tokenize_dataset(rows, self.tokenizer, cfg.data)
        self.train_cfg = dataclasses.replace(cfg.train, local_steps=cfg.train.local_steps * clients_per_round(cfg))
        self.moments = None  # train.keep_optimizer_state: AdamW's moments from the last round (fresh after a resume)

    def headline(self, state) -> str:
        return (f"fedft: centralized baseline on the pooled data ({len(self.examples)} rows), "
                f"{self.cfg.strategy.num_rounds} rounds of {self.train_cfg.local_steps} steps")

    def train(self, round_index: int, state) -> RoundResult:
        result = train_local(self.model, self.examples, self.tokenizer.pad_token_id, self.train_cfg,
                             global_state=state, round_index=round_index,
                             total_rounds=self.cfg.strategy.num_rounds, seed=client_seed(self.cfg.seed, round_index, 0),
                             optimizer_state=self.moments)
        self.moments = result.optimizer_state
        row = {"train_loss": result.train_loss, "bytes_up": 0, "bytes_down": 0, "clients": 1, "steps": result.steps}
        return RoundResult(result.state, row)

    def evaluate(self, state) -> dict:
        return self.evaluator(state)

    def save(self, state, directory: Path, extras: dict | None = None, *, model_card: bool = True) -> None:
        save_adapter(self.model, state, directory, extras, model_card=model_card)


class LocalRounds(_InProcessRounds):
    """Every client alone on its own partition; the state is one adapter per client."""

    stage, resumable = "local", False

    def __init__(self, cfg: FedftConfig, evaluator: HeldOutEvaluator) -> None:
        super().__init__(cfg, evaluator)
        n = cfg.simulation.num_supernodes
        parts = cached_partitions(cfg.data, n)
        self.examples = [tokenize_dataset(p, self.tokenizer, cfg.data)
                         for p in parts]
        self.moments = [None] * n  # train.keep_optimizer_state: each client's AdamW moments

    def headline(self, state) -> str:
        return (f"fedft: local-only baseline, {len(self.examples)} clients each alone, "
                f"{self.cfg.strategy.num_rounds} rounds")

    def train(self, round_index: int, states) -> RoundResult:
        results = [train_local(self.model, examples, self.tokenizer.pad_token_id, self.cfg.train,
                               global_state=states[client], round_index=round_index,
                               total_rounds=self.cfg.strategy.num_rounds,
                               seed=client_seed(self.cfg.seed, round_index, client),
                               optimizer_state=self.moments[client])
                   for client, examples in enumerate(self.examples)]
        self.moments = [r.optimizer_state for r in results]
        row = {"train_loss": _mean([r.train_loss for r in results]), "bytes_up": 0, "bytes_down": 0,
               "clients": len(results)}
        return RoundResult([r.state for r in results], row)

    def evaluate(self, states) -> dict:
        """The mean over clients of each one's held-out metrics, and each client's exact match."""
        if all(s is states[0] for s in states):  # round 0: every client still holds the base
            per_client = [self.evaluator(states[0])] * len(states)
        else:
            per_client = [self.evaluator(s) for s in states]
        tasks = sorted(per_client[0]["eval_exact_match_by_task"])
        base_answers = {ANSWERS: per_client[0][ANSWERS]} if all(s is states[0] for s in states) else {}
        return {
            **base_answers,  # round 0: the base's answers, which the stage evaluation reuses
            "eval_loss": _mean([m["eval_loss"] for m in per_client]),
            "eval_exact_match": _mean([m["eval_exact_match"] for m in per_client]),
            "eval_exact_match_by_task": {t: _mean([m["eval_exact_match_by_task"][t] for m in per_client])
                                         for t in tasks},
            "eval_exact_match_by_client": {f"client{i}": m["eval_exact_match"] for i, m in enumerate(per_client)},
        }

    def save(self, states, directory: Path, extras: dict | None = None, *, model_card: bool = True) -> None:
        for i, state in enumerate(states):
            save_adapter(self.model, state, Path(directory) / f"client{i}", model_card=model_card)


def run_centralized(cfg: FedftConfig, out_dir: Path, progress: Callable[[str], None] = print,
                    resume: bool = False) -> dict:
    """The centralized baseline, from the base model (or its latest checkpoint) to the report."""
    evaluator = HeldOutEvaluator(cfg)
    loop = RunLoop(cfg, out_dir, CentralizedRounds(cfg, evaluator), resume=resume, progress=progress)
    return loop.run(evaluator.initial_state)


def run_local(cfg: FedftConfig, out_dir: Path, progress: Callable[[str], None] = print) -> dict:
    """The local-only baseline, from the base model to the report."""
    evaluator = HeldOutEvaluator(cfg)
    loop = RunLoop(cfg, out_dir, LocalRounds(cfg, evaluator), progress=progress)
    return loop.run([evaluator.initial_state] * cfg.simulation.num_supernodes)
