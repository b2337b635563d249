"""Run a fedft config on one machine: Flower's Simulation Engine, or a baseline.

``simulate`` starts the same ServerApp and ClientApp that a deployment runs, on Flower's
Ray-backed Simulation Engine with the client resources from ``[simulation]``; the
``local`` and ``centralized`` baselines run in-process through the same fedft code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedft.config import ConfigError, FedftConfig
from fedft.run.directory import claimed_run_dir
from simulations import console


def simulate(cfg: FedftConfig, out_dir: Path, *, verbose: bool = False, resume: bool = False,
             overwrite: bool = False) -> dict:
    """Run the configured strategy and return its summary.json contents.

    ``resume`` continues a run after its latest complete checkpoint; ``overwrite`` replaces a
    run already in ``out_dir`` (else it is refused: ``fedft.run.directory``). Without
    ``verbose`` the console shows fedft's own lines and errors only (simulations/console.py).
    A run that cannot finish raises ``RunFailed`` (the federation's own error).
    """
    with console.quiet_third_party(verbose):  # before torch, tqdm, transformers and Ray start
        summary = _simulate(cfg, Path(out_dir), verbose=verbose, resume=resume, overwrite=overwrite)
    if not verbose:
        print(console.DIGEST)
    return summary


def _simulate(cfg: FedftConfig, out_dir: Path, *, verbose: bool, resume: bool, overwrite: bool) -> dict:
    if resume and cfg.strategy.name == "local":
        raise ConfigError("--resume works for federated and centralized runs; strategy.name = 'local' keeps one "
                          "adapter per client and writes no checkpoint")
    if cfg.privacy.record_level and not cfg.privacy.client_state_dir:
        # simulated clients keep their DP-SGD spend beside the run, so a resumed run still
        # enforces every client's limit (deployed clients use their node's state-dir)
        privacy = dataclasses.replace(cfg.privacy, client_state_dir=str(out_dir.resolve() / "client-privacy"))
        cfg = dataclasses.replace(cfg, privacy=privacy)
    if cfg.strategy.name in ("local", "centralized"):  # in this process (torch is imported only here)
        _check_run(cfg, out_dir, resume=resume)
        with claimed_run_dir(out_dir, resume=resume, overwrite=overwrite):
            from fedft.run.baselines import run_centralized, run_local

            return run_local(cfg, out_dir) if cfg.strategy.name == "local" else run_centralized(cfg, out_dir,
                                                                                               resume=resume)
    from simulations.federation_process import FederationChild, run_federation_in_child

    # the federation's process starts now and prepares during the checks (Ray, Flower's engine and its client
    # actors, the server's base); a refused run stops it before it touched the run directory
    with FederationChild(cfg, out_dir, resume=resume, verbose=verbose) as child:
        _check_run(cfg, out_dir, resume=resume)
        with claimed_run_dir(out_dir, resume=resume, overwrite=overwrite):
            return run_federation_in_child(child)


def _check_run(cfg: FedftConfig, out_dir: Path, *, resume: bool) -> None:
    """Every check before a run starts: data, model files, tokenized rows, the checkpoint resumed from."""
    from fedft.data.partition import check_simulation_data
    from fedft.model.files import check_model_files

    sizes = check_simulation_data(cfg)  # bad rows or empty partitions fail before anything starts
    check_model_files(cfg.model_path)
    tokenized = check_tokenized_data(cfg)  # long prompts, empty answers: refused or counted, before anything runs
    if resume:
        from fedft.run.resume import load_resume_point

        load_resume_point(out_dir, cfg)  # a changed config is refused before anything is touched
    print(f"fedft: {len(sizes)} clients with {', '.join(map(str, sizes))} training rows"
          + (f"; {tokenized}" if tokenized else ""))


def check_tokenized_data(cfg: FedftConfig) -> str:
    """Tokenize the training and held-out rows as the run will; a refused row raises ``DataError``
    naming every such row; returns what was truncated or skipped, in words."""
    from fedft.data.partition import cached_partitions
    from fedft.data.rows import TokenizeReport, read_rows, tokenize_dataset
    from fedft.model.load import load_tokenizer, model_spec

    tokenizer = load_tokenizer(model_spec(cfg))
    report = TokenizeReport([], [])
    data = cfg.data
    train = [row for part in cached_partitions(data, cfg.simulation.num_supernodes) for row in part]  # split once
    for rows in (train, read_rows(data.eval_file, data.columns)):
        tokenize_dataset(rows, tokenizer, data, report)
    return report.line()


