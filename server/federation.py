"""The server's round loop: configure, send, aggregate, evaluate, record, checkpoint.

It drives a Flower strategy's hooks (``configure_train`` / ``aggregate_train``) over a
``Grid`` itself instead of calling ``Strategy.start``, because fedft records more per
round than ``start`` exposes: bytes each way, held-out metrics per task, a PEFT
checkpoint, and a progress line. The same loop runs under the Simulation Engine and the
Deployment Engine.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedft import wire
from fedft.config import FedftConfig
from fedft.evaluate import HeldOutEvaluator
from fedft.checkpoint import save_tensors_atomic
from fedft.model import adapter_nbytes, save_adapter
from fedft.report import RunRecorder, format_progress, summarize
from server.strategy import make_strategy, payload_bytes


class FederationError(RuntimeError):
    """A round could not complete."""


def _should_evaluate(cfg: FedftConfig, round_index: int) -> bool:
    every = cfg.strategy.eval_every
    last = round_index == cfg.strategy.num_rounds
    return last or (every > 0 and round_index % every == 0)


def run_federation(
    grid: Grid, cfg: FedftConfig, out_dir: Path, progress: Callable[[str], None] = print
) -> dict:
    """Run every round; write metrics.jsonl, checkpoints, adapter/, summary.json, curves.png."""
    random.seed(cfg.seed)  # Flower's node sampling draws from the global RNG
    started = time.time()
    out_dir = Path(out_dir)
    recorder = RunRecorder(out_dir)
    evaluator = HeldOutEvaluator(cfg)
    state = evaluator.initial_state
    strategy = make_strategy(cfg)
    num_rounds = cfg.strategy.num_rounds
    progress(f"fedft: {cfg.strategy.name} over {cfg.simulation.num_supernodes} clients, "
             f"{num_rounds} rounds; adapter {adapter_nbytes(state) / 1e6:.2f} MB")

    t0 = time.time()
    base_metrics = evaluator(state)
    row0 = {"round": 0, "train_loss": None, "bytes_up": 0, "bytes_down": 0, "clients": 0,
            "seconds": time.time() - t0, **{k: v for k, v in base_metrics.items() if k != "samples"}}
    recorder.add_round(row0)
    progress(format_progress(row0, num_rounds) + "  (base model)")
    train_config = ConfigRecord({wire.CONFIG_JSON: wire.encode_config(cfg)})
    final_metrics = base_metrics
    for round_index in range(1, num_rounds + 1):
        t0 = time.time()
        messages = list(strategy.configure_train(
            round_index, ArrayRecord(torch_state_dict=state), train_config, grid))
        bytes_down = sum(payload_bytes(m.content) for m in messages)
        replies = list(grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout_s))
        arrays, _ = strategy.aggregate_train(round_index, replies)
        replied = strategy.last
        if arrays is None or len(replied.node_ids) < cfg.strategy.min_train_nodes:
            raise FederationError(
                f"round {round_index}: {len(replied.node_ids)} of {len(messages)} clients replied "
                f"(strategy.min_train_nodes = {cfg.strategy.min_train_nodes}); failures: "
                + ("; ".join(replied.failures) or "none reported")
            )
        state = arrays.to_torch_state_dict()
        row = {
            "round": round_index,
            "train_loss": replied.train_loss,
            "clients": len(replied.node_ids),
            "client_failures": replied.failures,
            "num_examples": replied.num_examples,
            "bytes_down": bytes_down,
            "bytes_up": replied.bytes_up,
            "bytes_up_per_client": replied.bytes_up / len(replied.node_ids),
            "bytes_down_per_client": bytes_down / len(messages),
            "adapter_bytes": adapter_nbytes(state),
            "aggregation": cfg.strategy.aggregation,
            "aggregation_error": replied.naive_error,
            "client_ranks": sorted(replied.ranks.values()),
        }
        if replied.discarded_energy is not None:
            row["svd_discarded_energy"] = replied.discarded_energy
        if _should_evaluate(cfg, round_index):
            final_metrics = evaluator(state)
            row.update({k: v for k, v in final_metrics.items() if k != "samples"})
        checkpoint = out_dir / "checkpoints" / f"round-{round_index:03d}"
        save_adapter(evaluator.model, state, checkpoint)
        optimizer_state = strategy.server_optimizer_state()
        if optimizer_state:
            save_tensors_atomic(optimizer_state, checkpoint / "server_optimizer.safetensors")
        row["seconds"] = time.time() - t0
        recorder.add_round(row)
        progress(format_progress(row, num_rounds))

    save_adapter(evaluator.model, state, out_dir / "adapter")
    recorder.plot(f"fedft {cfg.strategy.name}: {cfg.simulation.num_supernodes} clients")
    summary = summarize(cfg, recorder.rows, final_metrics, time.time() - started)
    recorder.write_summary(summary)
    progress(f"done in {summary['wall_seconds']:.0f}s: exact match "
             f"{100 * summary['final']['eval_exact_match']:.1f}% (base "
             f"{100 * summary['base']['eval_exact_match']:.1f}%); adapter in {out_dir / 'adapter'}")
    return summary
