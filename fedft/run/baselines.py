"""Baselines that put a number on the value of federation, run with the same code paths.

``local``: every client trains alone on its own partition for all rounds (no averaging);
each final adapter is scored on the pooled held-out set and the run reports their mean.
``centralized``: one trainer on the pooled training data with the same total number of
optimizer steps as the federation (rounds x local steps x clients per round). Both write
the files a federated run writes (metrics.jsonl, summary.json, adapter/, curves.png).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

from fedft.config import FedftConfig
from fedft.data.partition import partition_dataset
from fedft.data.rows import load_dataset_files, tokenize_dataset
from fedft.eval.held_out import HeldOutEvaluator
from fedft.federated.client_round import client_seed
from fedft.model.adapter import save_adapter
from fedft.run.recorder import RunRecorder, format_progress, summarize
from fedft.train.local import train_local


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _eval_row(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "samples"}


def run_local(cfg: FedftConfig, out_dir: Path, progress: Callable[[str], None] = print) -> dict:
    """Each client alone on its partition; scored on the pooled held-out set."""
    started = time.time()
    recorder = RunRecorder(out_dir)
    evaluator = HeldOutEvaluator(cfg)
    model, tokenizer = evaluator.model, evaluator.tokenizer
    n = cfg.simulation.num_supernodes
    parts = partition_dataset(load_dataset_files(cfg.data.train_files), cfg.data, n)
    examples = [tokenize_dataset(p, tokenizer, cfg.data.max_length, cfg.data.task_column) for p in parts]
    base = evaluator(evaluator.initial_state)
    recorder.add_round({"round": 0, "train_loss": None, "seconds": 0.0, **_eval_row(base)})
    states = [evaluator.initial_state] * n
    rounds = cfg.strategy.num_rounds
    for round_index in range(1, rounds + 1):
        t0 = time.time()
        losses = []
        for client in range(n):
            result = train_local(
                model, examples[client], tokenizer.pad_token_id, cfg.train,
                global_state=states[client], round_index=round_index, total_rounds=rounds,
                seed=client_seed(cfg, round_index, client),
            )
            states[client], _ = result.state, losses.append(result.train_loss)
        row = {"round": round_index, "train_loss": _mean(losses), "bytes_up": 0, "bytes_down": 0,
               "clients": n}
        if round_index == rounds:
            per_client = [evaluator(s) for s in states]
            tasks = sorted(per_client[0]["eval_exact_match_by_task"])
            row.update({
                "eval_loss": _mean([m["eval_loss"] for m in per_client]),
                "eval_exact_match": _mean([m["eval_exact_match"] for m in per_client]),
                "eval_exact_match_by_task": {
                    t: _mean([m["eval_exact_match_by_task"][t] for m in per_client]) for t in tasks},
                "eval_exact_match_by_client": {
                    f"client{i}": m["eval_exact_match"] for i, m in enumerate(per_client)},
            })
            for i, s in enumerate(states):
                save_adapter(model, s, out_dir / "adapter" / f"client{i}")
        row["seconds"] = time.time() - t0
        recorder.add_round(row)
        progress(format_progress(row, rounds) + f"  ({n} clients, each alone)")
    recorder.plot(f"fedft local-only: {n} clients, mean over clients")
    final = {k: recorder.rows[-1][k] for k in
             ("eval_loss", "eval_exact_match", "eval_exact_match_by_task", "eval_exact_match_by_client")}
    summary = summarize(cfg, recorder.rows, final, time.time() - started)
    recorder.write_summary(summary)
    progress(f"local-only mean exact match {100 * final['eval_exact_match']:.1f}% "
             f"(per client: {', '.join(f'{100 * v:.0f}%' for v in final['eval_exact_match_by_client'].values())})")
    return summary


def run_centralized(cfg: FedftConfig, out_dir: Path, progress: Callable[[str], None] = print) -> dict:
    """One trainer on the pooled data, as many optimizer steps as the whole federation."""
    started = time.time()
    recorder = RunRecorder(out_dir)
    evaluator = HeldOutEvaluator(cfg)
    model, tokenizer = evaluator.model, evaluator.tokenizer
    pooled = tokenize_dataset(load_dataset_files(cfg.data.train_files), tokenizer,
                              cfg.data.max_length, cfg.data.task_column)
    clients_per_round = max(cfg.strategy.min_train_nodes,
                            math.floor(cfg.simulation.num_supernodes * cfg.strategy.fraction_train))
    train_cfg = dataclasses.replace(cfg.train, local_steps=cfg.train.local_steps * clients_per_round)
    base = evaluator(evaluator.initial_state)
    recorder.add_round({"round": 0, "train_loss": None, "seconds": 0.0, **_eval_row(base)})
    state, final = evaluator.initial_state, base
    rounds = cfg.strategy.num_rounds
    for round_index in range(1, rounds + 1):
        t0 = time.time()
        result = train_local(model, pooled, tokenizer.pad_token_id, train_cfg, global_state=state,
                             round_index=round_index, total_rounds=rounds,
                             seed=client_seed(cfg, round_index, 0))
        state = result.state
        row = {"round": round_index, "train_loss": result.train_loss, "bytes_up": 0, "bytes_down": 0,
               "clients": 1, "steps": result.steps}
        every = cfg.strategy.eval_every
        if round_index == rounds or (every and round_index % every == 0):
            final = evaluator(state)
            row.update(_eval_row(final))
        row["seconds"] = time.time() - t0
        recorder.add_round(row)
        progress(format_progress(row, rounds) + f"  ({train_cfg.local_steps} steps on pooled data)")
    save_adapter(model, state, out_dir / "adapter")
    recorder.plot("fedft centralized: pooled data")
    summary = summarize(cfg, recorder.rows, final, time.time() - started)
    recorder.write_summary(summary)
    progress(f"centralized exact match {100 * final['eval_exact_match']:.1f}%")
    return summary
