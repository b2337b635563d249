"""``fedft simulate --seeds`` and ``--epsilons``: one config run several times, one result.

``--seeds 0,1,2`` runs the config once per seed (OUT/seed-N) and writes OUT/seeds.json (mean,
standard deviation, each seed). ``--epsilons 1,2,4,8,16,off`` runs it once per record-level
epsilon, DP-SGD calibrated to each (OUT/epsilon-E), and once without any DP (OUT/no-dp), then
writes the privacy-utility curve: OUT/privacy_utility.json, OUT/privacy_utility.png and a
table on the console. Both skip runs an earlier sweep finished when given ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fedft.config import ConfigError, FedftConfig

NO_DP = "off"


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` (or ``0-4``) as a list of distinct integers."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers such as 0,1,2 or 0-4") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct integers such as 0,1,2 or 0-4")
    return seeds


def parse_epsilons(text: str) -> list[float | None]:
    """``--epsilons 1,2,4,8,16,off`` as distinct positive epsilons, None for ``off`` (no DP)."""
    values: list[float | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = None if part == NO_DP else float(part)
        except ValueError:
            raise ConfigError(f"--epsilons {text!r}: {part!r} is not a number or '{NO_DP}'") from None
        if value is not None and not value > 0:
            raise ConfigError(f"--epsilons {text!r}: each epsilon must be > 0, got {part!r}")
        values.append(value)
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"--epsilons {text!r}: expected distinct values such as 1,2,4,8,16,{NO_DP}")
    return values


def epsilon_config(cfg: FedftConfig, epsilon: float | None) -> FedftConfig:
    """``cfg`` with DP-SGD calibrated to record-level ``epsilon``, or without any DP (None: user level
    off too), checked like a config file (a broken rule names the ``--epsilons`` value)."""
    from fedft.config import config_from_dict, config_to_dict

    raw = config_to_dict(cfg)
    raw["privacy"] = {**raw.get("privacy", {}), "record_level": epsilon is not None}
    if epsilon is None:
        raw["privacy"]["user_level"] = False
    else:
        raw["privacy"]["dp_sgd_target_epsilon"] = epsilon
    return config_from_dict(raw, source=f"--epsilons {NO_DP if epsilon is None else format(epsilon, 'g')}")


def run_dir_name(epsilon: float | None) -> str:
    return "no-dp" if epsilon is None else f"epsilon-{epsilon:g}"


def simulate_seeds(cfg: FedftConfig, args: argparse.Namespace) -> int:
    """The same config at each seed, in OUT/seed-N, then OUT/seeds.json: mean, std and each seed."""
    from fedft.report.seeds import SEEDS_FILE, seed_statistics, seeds_markdown
    from fedft.rundir import atomic_write_json, load_summary

    seeds, out = parse_seeds(args.seeds), Path(args.out)
    runs = [out / f"seed-{seed}" for seed in seeds]
    for index, (seed, run_dir) in enumerate(zip(seeds, runs), start=1):
        _run_once(dataclasses.replace(cfg, seed=seed), run_dir, args, f"seed {seed} ({index} of {len(seeds)})")
    statistics = seed_statistics([load_summary(r) for r in runs])
    atomic_write_json(out / SEEDS_FILE, {**statistics, "run_dirs": [str(r) for r in runs]})
    print(f"fedft: {len(seeds)} seeds, final held-out exact match (federated stage):")
    print(seeds_markdown(statistics))
    print(f"wrote {out / SEEDS_FILE}")
    return 0


def simulate_epsilons(cfg: FedftConfig, args: argparse.Namespace) -> int:
    """The config at each record-level epsilon (and without DP), then the privacy-utility curve."""
    from fedft.privacy.bookkeeping import LEDGER_FILE
    from fedft.privacy.ledger import read_ledger
    from fedft.report.privacy_curve import CURVE_FILE, CURVE_PLOT, curve_markdown, curve_point, plot_curve
    from fedft.rundir import atomic_write_json, load_summary

    epsilons, out = parse_epsilons(args.epsilons), Path(args.out)
    configs = [epsilon_config(cfg, epsilon) for epsilon in epsilons]  # all checked before the first run
    points = []
    for index, (epsilon, config) in enumerate(zip(epsilons, configs), start=1):
        run_dir = out / run_dir_name(epsilon)
        label = "without DP" if epsilon is None else f"record-level epsilon {epsilon:g}"
        _run_once(config, run_dir, args, f"{label} ({index} of {len(epsilons)})")
        ledger = read_ledger(run_dir / LEDGER_FILE)
        sigmas = [entry["noise_multiplier"] for row in ledger[:1] for entry in row.record_level.values()]
        points.append({**curve_point(epsilon, load_summary(run_dir), max(sigmas, default=None)),
                       "run_dir": str(run_dir)})
    atomic_write_json(out / CURVE_FILE, {"delta": cfg.privacy.delta, "points": points})
    plot_curve(points, out / CURVE_PLOT, title=f"record-level DP-SGD, delta {cfg.privacy.delta:g}")
    print("fedft: privacy-utility curve (final held-out exact match):")
    print(curve_markdown(points))
    print(f"wrote {out / CURVE_FILE} and {out / CURVE_PLOT}")
    return 0


def _run_once(cfg: FedftConfig, run_dir: Path, args: argparse.Namespace, label: str) -> None:
    """One run of a sweep; with --resume a finished run is kept and an unstarted one starts."""
    from fedft.rundir import SUMMARY_FILE, latest_checkpoint
    from simulations.runner import simulate

    resume = args.resume
    if resume and (run_dir / SUMMARY_FILE).is_file():
        print(f"fedft: {label} already finished in {run_dir}")
        return
    if resume and latest_checkpoint(run_dir) is None:
        resume = False  # --resume of a sweep: a run that never started starts now
    print(f"fedft: {label} in {run_dir}")
    simulate(cfg, run_dir, verbose=args.verbose, resume=resume, overwrite=args.overwrite)
