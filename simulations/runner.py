"""Run a fedft config on one machine: Flower's Simulation Engine, or a baseline.

``simulate`` starts the same ServerApp and ClientApp that a deployment runs, on Flower's
Ray-backed Simulation Engine with the client resources from ``[simulation]``; the
``local`` and ``centralized`` baselines run in-process through the same fedft code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from fedft.config import ConfigError, FedftConfig
from fedft.rundir import SUMMARY_FILE
from simulations import console


def simulate(cfg: FedftConfig, out_dir: Path, *, verbose: bool = False, resume: bool = False) -> dict:
    """Run the configured strategy and return its summary.json contents.

    ``resume`` continues a federated run after its latest complete checkpoint. Without
    ``verbose`` the console shows fedft's own lines and errors only (simulations/console.py).
    """
    with console.quiet_third_party(verbose):  # before torch, tqdm, transformers and Ray start
        summary = _simulate(cfg, out_dir, verbose=verbose, resume=resume)
    if not verbose:
        print(console.DIGEST)
    return summary


def _simulate(cfg: FedftConfig, out_dir: Path, *, verbose: bool, resume: bool) -> dict:
    from fedft.data.partition import check_simulation_data
    from fedft.run.baselines import run_centralized, run_local

    if resume and cfg.strategy.name in ("local", "centralized"):
        raise ConfigError(f"--resume works for federated runs; strategy.name = {cfg.strategy.name!r} is a baseline")
    if cfg.privacy.record_level and not cfg.privacy.client_state_dir:
        # simulated clients keep their DP-SGD spend beside the run, so a resumed run still
        # enforces every client's limit (deployed clients use their node's state-dir)
        privacy = dataclasses.replace(cfg.privacy, client_state_dir=str(Path(out_dir).resolve() / "client-privacy"))
        cfg = dataclasses.replace(cfg, privacy=privacy)
    sizes = check_simulation_data(cfg)  # bad rows or empty partitions fail before anything starts
    print(f"fedft: {len(sizes)} clients with {', '.join(map(str, sizes))} training rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.strategy.name == "local":
        return run_local(cfg, out_dir)
    if cfg.strategy.name == "centralized":
        return run_centralized(cfg, out_dir)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app

    if not verbose:  # importing flwr set its logger to DEBUG
        console.quiet_loggers()
    backend_config = {
        "client_resources": {
            "num_cpus": cfg.simulation.num_cpus,
            "num_gpus": cfg.simulation.num_gpus,
        },
        "init_args": {"include_dashboard": False, "logging_level": logging.ERROR},
    }
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    run_simulation(
        server_app=make_server_app(cfg, out_dir, resume=resume),
        client_app=client_app,
        num_supernodes=cfg.simulation.num_supernodes,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    summary_path = out_dir / SUMMARY_FILE
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
