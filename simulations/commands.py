"""The ``fedft`` command's flwr-free subcommands and shared argument handling.

``simulations/cli.py`` adds ``simulate`` (which needs Flower) and is the installed entry
point; everything registered here works without Flower: ``fedft demo data`` writes the
demo's institutions' JSONL, ``fedft demo build-base`` rebuilds the embedded base model,
``fedft compare RUN_DIR ...`` tabulates and plots finished runs side by side,
``fedft privacy report RUN_DIR`` audits a run's privacy ledger, ``fedft certs HOST ...``
creates TLS certificates for a deployment and ``fedft node-key NAME`` a SuperNode's key
pair, ``fedft export RUN_DIR --out DIR [--merge]`` writes a run's adapter (PEFT format) or one merged standalone model, ``fedft report RUN_DIR
[--evaluate]`` writes a run's report.md, report.json and plots (evaluating every stage first).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from fedft.config import ConfigError, load_config
from fedft.data.partition import PartitionError
from fedft.data.rows import DataError
from fedft.model.quantization import QuantizationError
from fedft.run.export import EXPORT_DTYPES, STAGE_DIRS, ExportError
from fedft.rundir import RunDirError, RunFailed, atomic_write_text

USER_ERRORS = (ConfigError, DataError, PartitionError, ExportError, FileNotFoundError, RunDirError,
               QuantizationError)

DEMO_DATA_DIR = Path(__file__).resolve().parent.parent / "simulations" / "data" / "demo"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a fedft TOML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")


def config_from_args(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def _demo_data(args: argparse.Namespace) -> int:
    from fedft.demo.pairs import write_demo_preferences
    from fedft.demo.tasks import make_demo_rows, make_eval_rows, write_jsonl

    out = Path(args.out)
    rows = make_demo_rows(args.institutions, args.rows, args.own_share, seed=args.seed)
    eval_rows = make_eval_rows(args.eval_rows, seed=args.seed + 1)
    write_jsonl(rows, out / "train.jsonl")
    write_jsonl(eval_rows, out / "eval.jsonl")
    prefs = write_demo_preferences(out, rows, eval_rows, seed=args.seed)  # for the DPO stage
    print(f"wrote {out / 'train.jsonl'}, {out / 'eval.jsonl'}, {prefs[0]} and {prefs[1]}")
    if args.per_institution:  # what each institution of a deployment would hold on its own
        for name in sorted({row["institution"] for row in rows}):
            write_jsonl([row for row in rows if row["institution"] == name], out / f"{name}.jsonl")
            print(f"wrote {out / f'{name}.jsonl'}")
    return 0


def _demo_build_base(args: argparse.Namespace) -> int:
    from fedft.demo.base import build_base_model

    build_base_model(Path(args.out), steps=args.steps, seed=args.seed)
    print(f"wrote the demo base model to {args.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedft.report.compare import (
        comparison_markdown,
        comparison_rows,
        plot_comparison,
    )

    rows = comparison_rows([Path(d) for d in args.runs])
    print(comparison_markdown(rows))
    plot_comparison(rows, Path(args.plot))
    print(f"wrote {args.plot}")
    return 0


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


def _certs(args: argparse.Namespace) -> int:
    from fedft.deploy.certs import explain, make_certificates

    try:
        paths = make_certificates(Path(args.out), args.hosts, days=args.days)
    except (FileExistsError, ValueError) as err:
        print(f"fedft: error: {err}", file=sys.stderr)
        return 2
    print(explain(paths, args.hosts))
    return 0


def _node_key(args: argparse.Namespace) -> int:
    from fedft.deploy.certs import make_node_key

    try:
        private, public = make_node_key(Path(args.out), args.name)
    except (FileExistsError, ValueError) as err:
        print(f"fedft: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {private} (keep it here: flower-supernode --auth-supernode-private-key {private})")
    print(f"wrote {public} (send it to the coordinator: flwr supernode register {public.name} <superlink>)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedft.run.export import export_run

    export_run(Path(args.run_dir), Path(args.out), merge=args.merge, dtype=args.dtype,
               stage=args.stage, device=args.device)
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedft.report.markdown import REPORT_JSON, REPORT_MD, ReportError, build_report

    run_dir = Path(args.run_dir)
    if not args.evaluate and (args.compare or args.general_text or args.pairs):
        print("fedft: error: --compare, --general-text and --pairs need --evaluate", file=sys.stderr)
        return 2
    try:
        if args.evaluate:
            from fedft.eval.inputs import evaluate_run

            evaluate_run(run_dir, compare=[Path(d) for d in args.compare], num_samples=args.samples,
                         general_text=Path(args.general_text) if args.general_text else None,
                         pairs_file=Path(args.pairs) if args.pairs else None)
        report = build_report(run_dir)
    except ReportError as err:
        print(f"fedft: error: {err}", file=sys.stderr)
        return 2
    for line in report["omitted"]:
        print(f"omitted: {line}")
    print(f"wrote {run_dir / REPORT_MD}, {run_dir / REPORT_JSON} and {len(report['plots'])} plot(s)")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``fedft`` parser with every flwr-free subcommand, and its subparsers for more."""
    parser = argparse.ArgumentParser(prog="fedft", description="Federated QLoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo_commands(commands)
    _add_compare_command(commands)
    _add_key_commands(commands)
    _add_privacy_commands(commands)
    _add_policy_commands(commands)
    _add_status_command(commands)
    _add_export_command(commands)
    _add_report_command(commands)
    return parser, commands


def _add_demo_commands(commands: argparse._SubParsersAction) -> None:
    """``fedft demo data`` and ``fedft demo build-base``."""
    demo = commands.add_parser("demo", help="rebuild the embedded demo data or base model")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    data = demo_commands.add_parser("data", help="write the demo institutions' JSONL files")
    data.add_argument("--out", default=str(DEMO_DATA_DIR))
    data.add_argument("--institutions", type=int, default=4)
    data.add_argument("--rows", type=int, default=400, help="training rows per institution")
    data.add_argument("--own-share", type=float, default=0.9,
                      help="share of an institution's rows drawn from its own task")
    data.add_argument("--eval-rows", type=int, default=100, help="held-out rows per task")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--per-institution", action="store_true",
                      help="also write one INSTITUTION.jsonl per institution (for a deployment)")
    data.set_defaults(handler=_demo_data)
    base = demo_commands.add_parser("build-base", help="pretrain the tiny demo Llama")
    base.add_argument("--out", required=True)
    base.add_argument("--steps", type=int, default=1200)
    base.add_argument("--seed", type=int, default=0)
    base.set_defaults(handler=_demo_build_base)


def _add_compare_command(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser("compare", help="table and bar chart of several runs")
    compare.add_argument("runs", nargs="+", help="run directories (the first also gives the base model)")
    compare.add_argument("--plot", default="comparison.png", help="where to write the bar chart")
    compare.set_defaults(handler=_compare)


def _add_key_commands(commands: argparse._SubParsersAction) -> None:
    """``fedft certs`` and ``fedft node-key``: a deployment's TLS certificates and SuperNode keys."""
    certs = commands.add_parser("certs", help="create a CA and a SuperLink TLS certificate")
    certs.add_argument("hosts", nargs="+", help="host names / IP addresses the SuperLink is reached at")
    certs.add_argument("--out", default="certificates", help="directory for ca.crt, ca.key, server.crt, server.key")
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.set_defaults(handler=_certs)
    node_key = commands.add_parser("node-key", help="create a SuperNode authentication key pair")
    node_key.add_argument("name", help="file name of the private key (the public key gets .pub)")
    node_key.add_argument("--out", default="keys", help="directory for the key pair")
    node_key.set_defaults(handler=_node_key)


def _add_privacy_commands(commands: argparse._SubParsersAction) -> None:
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


def _policy_init(args: argparse.Namespace) -> int:
    """``fedft policy init``: a commented policy template, the model's checksum filled in."""
    from fedft.federated.policy import PolicyError, policy_template, weights_sha256

    out = Path(args.out)
    if out.exists():
        print(f"fedft: error: {out} exists; remove it or choose another --out (nothing was written)", file=sys.stderr)
        return 2
    model, checksum = "", ""
    if args.model:
        model_dir = Path(args.model).resolve()
        if not model_dir.is_dir():
            print(f"fedft: error: --model {args.model}: not a local model directory", file=sys.stderr)
            return 2
        try:
            checksum = weights_sha256(model_dir)
        except PolicyError as err:
            print(f"fedft: error: {err}", file=sys.stderr)
            return 2
        model = str(model_dir)
    atomic_write_text(out, policy_template(model, checksum))
    print(f"wrote {out}" + (f" (model {model}, weights sha256 {checksum[:12]}...)" if model else ""))
    print(f"start the SuperNode with --node-config \"... policy='{out.resolve()}'\"")
    return 0


def _add_policy_commands(commands: argparse._SubParsersAction) -> None:
    policy = commands.add_parser("policy", help="an institution's policy: what its client accepts")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    init = policy_commands.add_parser("init", help="write a commented policy template")
    init.add_argument("--out", default="fedft-policy.toml", help="the policy file to write (must not exist)")
    init.add_argument("--model", help="the base model directory to pin (its weights' SHA-256 is computed)")
    init.set_defaults(handler=_policy_init)


def _status(args: argparse.Namespace) -> int:
    from fedft.run.status import run_status

    status = run_status(Path(args.run_dir))
    print(f"{args.run_dir}: {status.text}")
    return status.code


def _add_status_command(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser(
        "status", help="how a run ended: exit 0 finished, 1 failed or incomplete, 3 still running "
                       "(for deployments, where `flwr run --stream` exits 0 either way)")
    status.add_argument("run_dir", help="a run directory (--out, or the ServerApp's out-dir)")
    status.set_defaults(handler=_status)


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


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="write a run's adapter (PEFT format) or, with --merge, one standalone model")
    export.add_argument("run_dir", help="a finished run directory (summary.json, adapter/)")
    export.add_argument("--out", required=True, help="a new (or empty) directory for the export")
    export.add_argument("--merge", action="store_true",
                        help="merge the adapter into the (dequantized) base: a model that loads with "
                             "AutoModelForCausalLM.from_pretrained alone")
    export.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="fp32",
                        help="dtype of the written tensors (merging is always done in fp32); default fp32")
    export.add_argument("--stage", choices=list(STAGE_DIRS),
                        help="which adapter (default: dpo if RUN_DIR/dpo/adapter exists, else sft)")
    export.add_argument("--device", default="cpu", help="where to load and merge the base (cpu, cuda, auto)")
    export.set_defaults(handler=_export)


def _add_report_command(commands: argparse._SubParsersAction) -> None:
    report_cmd = commands.add_parser(
        "report", help="write RUN_DIR/report.md, report.json and plots from the run's files")
    report_cmd.add_argument("run_dir", help="a finished run directory (summary.json, metrics.jsonl, ...)")
    report_cmd.add_argument("--evaluate", action="store_true",
                            help="first score every stage (base, federated, dpo, --compare runs) into "
                                 "RUN_DIR/evaluation.json (loads the model)")
    report_cmd.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                            help="with --evaluate: also score these runs' adapters (a centralized or "
                                 "local-only baseline of the same base model)")
    report_cmd.add_argument("--general-text", help="with --evaluate: text file (.txt lines or .jsonl "
                                                   "'text') for the forgetting probe; default: the run's report.general_text")
    report_cmd.add_argument("--pairs", help="with --evaluate: held-out preference pairs (JSONL); "
                                            "default: the run's dpo/pairs-eval.jsonl, else dpo.eval_path")
    report_cmd.add_argument("--samples", type=int, default=5, help="generated samples kept per stage")
    report_cmd.set_defaults(handler=_report)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and dispatch: user errors print one clear line and exit 2, a run that could not
    finish exits 1 with its reason, an interrupted one 130."""
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as err:
        print(f"fedft: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"fedft: run failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print("fedft: interrupted; the run directory keeps every complete round (--resume continues it)",
              file=sys.stderr)
        return 128 + getattr(interrupt, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    return run(parser, argv)
