"""``fedft privacy report`` (a run's ledger audited, or an institution's own trail checked against it)
and ``fedft privacy plan`` (epsilon and noise before any training, with the ledger's accounting)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _node_report(args: argparse.Namespace) -> int:
    """``fedft privacy report --node STATE_DIR [RUN_DIR]``: the institution's own trail, checked."""
    from fedft.federated.audit_trail import (
        TRAIL_FILE,
        TrailError,
        node_report,
        print_node_report,
    )
    from fedft.privacy.audit import load_run_ledger
    from fedft.privacy.ledger import LedgerError

    state_dir = Path(args.node)
    if not (state_dir / TRAIL_FILE).is_file():
        print(f"fedft: error: {state_dir / TRAIL_FILE} does not exist: is {state_dir} the state-dir "
              "of a SuperNode that joined a round?", file=sys.stderr)
        return 2
    try:
        ledger = load_run_ledger(Path(args.run_dir)) if args.run_dir else None
        report = node_report(state_dir, ledger, args.run_id)
    except (LedgerError, TrailError) as err:
        print(f"fedft: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_node_report(report)
    return 1 if report["mismatches"] or report["ledger_flags"] else 0


def _privacy_report(args: argparse.Namespace) -> int:
    from fedft.privacy.audit import PLOT_FILE, plot_epsilon, print_table, privacy_report
    from fedft.privacy.ledger import LedgerError

    if args.node:
        return _node_report(args)
    if not args.run_dir:
        print("fedft: error: privacy report needs RUN_DIR (a run's ledger) or --node STATE_DIR", file=sys.stderr)
        return 2
    try:
        report = privacy_report(Path(args.run_dir))
    except LedgerError as err:
        print(f"fedft: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    plot = plot_epsilon(report, Path(args.plot) if args.plot else Path(args.run_dir) / PLOT_FILE)
    if not args.json:
        print(f"wrote {plot}")
    return 1 if report["mismatches"] else 0


def add_privacy_commands(commands: argparse._SubParsersAction) -> None:
    """``fedft privacy report`` and ``fedft privacy plan``."""
    privacy = commands.add_parser("privacy", help="audit a run's privacy ledger, or plan a run's privacy")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)
    report = privacy_commands.add_parser(
        "report", help="table and plot of the ledger; every epsilon recomputed, mismatches flagged "
                       "(exit status 1 if any)")
    report.add_argument("run_dir", nargs="?", help="a run directory with privacy_ledger.jsonl (with --node: the "
                                                   "coordinator's run to compare the institution's trail with)")
    report.add_argument("--node", metavar="STATE_DIR",
                        help="an institution's state-dir: recompute its epsilon from its own audit trail and, "
                             "given RUN_DIR, flag every round the coordinator's ledger records differently")
    report.add_argument("--run-id", type=int, help="with --node and RUN_DIR: the Flower run id of RUN_DIR "
                                                   "(default: the trail's latest run)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--plot", help="where to write the epsilon plot (default RUN_DIR/privacy_epsilon.png)")
    report.set_defaults(handler=_privacy_report)
    _add_plan_command(privacy_commands)


def _privacy_plan(args: argparse.Namespace) -> int:
    """``fedft privacy plan``: epsilon per round and in total, the noise it costs, before any training."""
    import dataclasses

    from fedft.privacy.planner import format_plan, plan_record_level, plan_user_level

    if args.clients is None and args.examples is None:
        print("fedft: error: privacy plan needs --clients (user level) and/or --examples (record level)",
              file=sys.stderr)
        return 2
    try:
        user = record = None
        if args.clients is not None:
            user = plan_user_level(args.clients, args.rounds, args.delta, sampled=args.per_round, rate=args.rate,
                                   sampling=args.sampling, noise_multiplier=args.z, target_epsilon=args.target_epsilon,
                                   max_noise_ratio=args.max_noise_ratio)
        if args.examples is not None:
            if args.batch is None or args.steps is None:
                raise ValueError("record level needs --batch and --steps (per round) with --examples")
            record = plan_record_level(args.examples, args.batch, args.steps, args.rounds, args.delta,
                                       noise_multiplier=args.sigma, target_epsilon=args.record_target_epsilon,
                                       max_noise_ratio=args.max_noise_ratio)
    except ValueError as err:
        print(f"fedft: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"user_level": user and dataclasses.asdict(user),
                          "record_level": record and dataclasses.asdict(record)}, indent=2))
    else:
        print(format_plan(user, record, args.params))
    return 0


def _add_plan_command(privacy_commands: argparse._SubParsersAction) -> None:
    plan = privacy_commands.add_parser(
        "plan", help="epsilon per round and in total, the noise needed for a target and its noise-to-signal, "
                     "before any training (same accounting as the ledger)")
    plan.add_argument("--rounds", type=int, required=True, help="federated rounds")
    plan.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    user = plan.add_argument_group("user level (DP-FedAvg: one unit = one institution or user)")
    user.add_argument("--clients", type=int, help="N, the population")
    sample = user.add_mutually_exclusive_group()
    sample.add_argument("--per-round", type=int, help="m, clients sampled per round (fixed-size sampling)")
    sample.add_argument("--rate", type=float, help="q, each client's inclusion probability (poisson sampling)")
    user.add_argument("--sampling", choices=["fixed", "poisson", "none"], default="fixed",
                      help="how clients are sampled (privacy.client_sampling; default fixed)")
    noise = user.add_mutually_exclusive_group()
    noise.add_argument("--z", type=float, help="the server's noise multiplier z")
    noise.add_argument("--target-epsilon", type=float, help="calibrate z to this user-level epsilon")
    record = plan.add_argument_group("record level (DP-SGD in each client: one unit = one example)")
    record.add_argument("--examples", type=int, help="n, one client's local examples")
    record.add_argument("--batch", type=int, help="B, the expected (Poisson) batch size")
    record.add_argument("--steps", type=int, help="DP-SGD steps per round")
    sigma = record.add_mutually_exclusive_group()
    sigma.add_argument("--sigma", type=float, help="the DP-SGD noise multiplier")
    sigma.add_argument("--record-target-epsilon", type=float, help="calibrate sigma to this record-level epsilon")
    plan.add_argument("--params", type=int, help="trainable parameters (adds the noise vector's norm)")
    plan.add_argument("--max-noise-ratio", type=float, default=0.1,
                      help="noise std on the mean, in units of the clip norm, above which a plan is called "
                           "out of reach (default 0.1, a rule of thumb)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_privacy_plan)
