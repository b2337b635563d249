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

from fedft.config import FedftConfig
from fedft.eval.held_out import HeldOutEvaluator
from fedft.federated import wire
from fedft.model.adapter import adapter_nbytes, save_adapter
from fedft.privacy.bookkeeping import LEDGER_FILE, PrivacyBookkeeper
from fedft.run.final_stages import run_final_stages, write_report
from fedft.run.recorder import RunRecorder, format_progress, summarize
from fedft.run.resume import checkpoint_extras, load_resume_point
from server.strategy import make_strategy, payload_bytes


class FederationError(RuntimeError):
    """A round could not complete."""


def _should_evaluate(cfg: FedftConfig, round_index: int) -> bool:
    every = cfg.strategy.eval_every
    last = round_index == cfg.strategy.num_rounds
    return last or (every > 0 and round_index % every == 0)


def planned_sample_size(cfg: FedftConfig, num_nodes: int) -> int:
    """How many clients Flower's FedAvg samples per round (its own formula)."""
    return max(int(num_nodes * cfg.strategy.fraction_train), cfg.strategy.min_train_nodes)


def _eval_metrics(metrics: dict) -> dict:
    """The held-out metrics a row records (an evaluator's result less its sample answers)."""
    return {k: v for k, v in metrics.items() if k.startswith("eval_")}


def run_federation(
    grid: Grid, cfg: FedftConfig, out_dir: Path, progress: Callable[[str], None] = print,
    resume: bool = False,
) -> dict:
    """Run every round; write metrics.jsonl, checkpoints, adapter/, summary.json, curves.png.

    With ``resume`` the run continues after its latest complete checkpoint (same config):
    adapter, metrics, privacy ledger and server optimizer state come from that checkpoint.
    """
    started = time.time()
    out_dir = Path(out_dir)
    recorder = RunRecorder(out_dir)
    evaluator = HeldOutEvaluator(cfg)
    strategy = make_strategy(cfg)
    num_rounds = cfg.strategy.num_rounds
    accounted = cfg.privacy.user_level or cfg.privacy.record_level
    point = load_resume_point(out_dir, cfg) if resume else None
    if point is None:
        state, first_round = evaluator.initial_state, 1
    else:
        state, first_round = point.state, point.round + 1
        strategy.restore_server_optimizer(point.optimizer_state)
    resume_rows = None if point is None else point.ledger_rows or []
    privacy = PrivacyBookkeeper(cfg.privacy, out_dir / LEDGER_FILE, resume_rows) if accounted else None
    random.seed(cfg.seed + first_round - 1)  # Flower's node sampling draws from the global RNG
    progress(f"fedft: {cfg.strategy.name} over {cfg.simulation.num_supernodes} clients, "
             f"{num_rounds} rounds; adapter {adapter_nbytes(state) / 1e6:.2f} MB")

    if point is None:
        t0 = time.time()
        base_metrics = evaluator(state)
        row0 = {"round": 0, "train_loss": None, "bytes_up": 0, "bytes_down": 0, "clients": 0,
                "seconds": time.time() - t0, **_eval_metrics(base_metrics)}
        recorder.add_round(row0)
        progress(format_progress(row0, num_rounds) + "  (base model)")
        final_metrics, evaluated_round = base_metrics, 0
    else:
        for row in point.metrics_rows:
            recorder.add_round(row)
        evaluated_round = max(r["round"] for r in point.metrics_rows if "eval_loss" in r)
        final_metrics = _eval_metrics(point.metrics_rows[evaluated_round])
        progress(f"resuming after round {point.round} from {point.path}")
    train_config = ConfigRecord({wire.CONFIG_JSON: wire.encode_config(cfg)})
    completed = first_round - 1
    for round_index in range(first_round, num_rounds + 1):
        t0 = time.time()
        num_nodes = len(list(grid.get_node_ids()))
        if privacy is not None:
            refusal = privacy.refuse_round(round_index, num_nodes, planned_sample_size(cfg, num_nodes))
            if refusal:
                progress(refusal)
                break
        messages = list(strategy.configure_train(
            round_index, ArrayRecord(torch_state_dict=state), train_config, grid))
        bytes_down = sum(payload_bytes(m.content) for m in messages)
        replies = list(grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout_s))
        arrays, _ = strategy.aggregate_train(round_index, replies)
        replied = strategy.last
        too_few = arrays is None or (len(replied.node_ids) < cfg.strategy.min_train_nodes
                                     and not cfg.privacy.poisson_clients)
        if too_few and replied.refusals and len(replied.refusals) == len(replied.failures):
            progress(f"round {round_index}: {len(replied.refusals)} of {len(messages)} clients declined "
                     f"(record-level privacy limits reached) and too few remain "
                     f"(strategy.min_train_nodes = {cfg.strategy.min_train_nodes}); stopping after round "
                     f"{round_index - 1}")
            break
        if too_few:
            raise FederationError(
                f"round {round_index}: {len(replied.node_ids)} of {len(messages)} clients replied "
                f"(strategy.min_train_nodes = {cfg.strategy.min_train_nodes}) with a valid update; "
                f"failures and rejected updates: "
                + ("; ".join(replied.failures + replied.rejected) or "none reported")
            )
        state = arrays.to_torch_state_dict()
        completed = round_index
        row = {
            "round": round_index,
            "train_loss": replied.train_loss,
            "clients": len(replied.node_ids),
            "client_failures": replied.failures,
            "rejected_updates": replied.rejected,
            "num_examples": replied.num_examples,
            "bytes_down": bytes_down,
            "bytes_up": replied.bytes_up,
            "bytes_up_per_client": replied.bytes_up / max(1, len(replied.node_ids)),
            "bytes_down_per_client": bytes_down / max(1, len(messages)),
            "adapter_bytes": adapter_nbytes(state),
            "aggregation": cfg.strategy.aggregation,
            "aggregation_error": replied.naive_error,
            "client_ranks": sorted(replied.ranks.values()),
        }
        if replied.discarded_energy is not None:
            row["svd_discarded_energy"] = replied.discarded_energy
        if privacy is not None:
            ledger_row = privacy.record_round(round_index, replied.sampled, replied.node_ids, num_nodes,
                                              replied.clipped_fraction, replied.record_level, replied.refusals)
            row.update({"epsilon_user_rdp": ledger_row.epsilon_user_rdp,
                        "epsilon_user_pld": ledger_row.epsilon_user_pld,
                        "clipped_fraction": ledger_row.clipped_fraction,
                        "epsilon_record_max": max((e["epsilon"] for e in ledger_row.record_level.values()),
                                                  default=None),
                        "refusals": ledger_row.refusals})
        if _should_evaluate(cfg, round_index):
            final_metrics = evaluator(state)
            evaluated_round = round_index
            row.update(_eval_metrics(final_metrics))
        row["seconds"] = time.time() - t0
        ledger_rows = [r.to_dict() for r in privacy.rows] if privacy is not None else None
        extras = checkpoint_extras(round_index, cfg, recorder.rows + [row], ledger_rows,
                                   strategy.server_optimizer_state())
        save_adapter(evaluator.model, state, out_dir / "checkpoints" / f"round-{round_index:03d}", extras)
        recorder.add_round(row)
        if privacy is not None:
            privacy.flush()
        progress(format_progress(row, num_rounds))
        for reason in replied.rejected:
            progress(f"  rejected update from {reason}")

    if completed and evaluated_round != completed:  # stopped early (a privacy budget)
        final_metrics = evaluator(state)
        recorder.amend_last(_eval_metrics(final_metrics))
    save_adapter(evaluator.model, state, out_dir / "adapter")
    canary_audit = None
    if cfg.privacy.canaries:
        from fedft.privacy.canaries import audit_canaries
        from fedft.rundir import atomic_write_json

        progress(f"canary audit: scoring {cfg.privacy.canaries} canaries against random secrets ...")
        canary_audit = audit_canaries(cfg, evaluator.model, evaluator.tokenizer)  # model holds `state`
        atomic_write_json(out_dir / "canary_audit.json", canary_audit)
    recorder.plot(f"fedft {cfg.strategy.name}: {cfg.simulation.num_supernodes} clients")
    summary = summarize(cfg, recorder.rows, final_metrics, time.time() - started)
    if privacy is not None:
        summary["privacy"] = privacy.summary()
    if canary_audit is not None:
        summary["canary_audit"] = canary_audit
        formal = (summary.get("privacy") or {}).get("epsilon_user_rdp")
        progress(f"canary audit: {canary_audit['correct_guesses']} of {canary_audit['guesses']} membership "
                 f"guesses right; empirical epsilon >= {canary_audit['epsilon_lower_bound']:.2f} at "
                 f"{canary_audit['significance']:.0%} significance (a lower bound; formal user-level "
                 f"epsilon {'-' if formal is None else f'{formal:.2f}'}); mean exposure "
                 f"{canary_audit['mean_exposure_bits'] or 0:.2f} of {canary_audit['max_possible_exposure_bits']:.0f} bits")
    recorder.write_summary(summary)
    progress(f"federated rounds done in {summary['wall_seconds']:.0f}s: exact match "
             f"{100 * summary['final']['eval_exact_match']:.1f}% (base "
             f"{100 * summary['base']['eval_exact_match']:.1f}%); adapter in {out_dir / 'adapter'}")
    added = run_final_stages(cfg, out_dir, state, progress)
    if added:
        summary.update(added)
        recorder.write_summary(summary)
    write_report(out_dir, progress)
    return summary
