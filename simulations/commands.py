"""The ``fedft`` command's flwr-free subcommands and shared argument handling.

``simulations/cli.py`` adds ``simulate`` (which needs Flower) and is the installed entry
point; everything registered here works without Flower: ``fedft demo data`` writes the
demo's institutions' JSONL, ``fedft demo build-base`` rebuilds the embedded base model,
``fedft compare RUN_DIR ...`` tabulates and plots finished runs side by side,
``fedft status RUN_DIR`` says how a run ended, ``fedft export RUN_DIR --out DIR [--merge]``
writes a run's adapter (PEFT format) or one merged standalone model, ``fedft report RUN_DIR
[--evaluate]`` writes a run's report.md, report.json and plots (evaluating every stage first).
The privacy commands (report, plan) live in privacy_commands.py, an institution's set-up
commands (certs, node-key, policy init) in node_commands.py.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fedft.config import ConfigError, load_config
from fedft.data.partition import PartitionError
from fedft.data.rows import DataError
from fedft.model.quantization import QuantizationError
from fedft.run.export import EXPORT_DTYPES, STAGE_DIRS, ExportError
from fedft.rundir import RunDirError, RunFailed
from simulations.node_commands import add_node_commands
from simulations.privacy_commands import add_privacy_commands

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
    add_node_commands(commands)
    add_privacy_commands(commands)
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
    report_cmd.add_argument("--general-text", help="with --evaluate: text file (.txt lines or .jsonl 'text') "
                                                   "for the forgetting probe; default: the run's "
                                                   "report.general_text")
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
