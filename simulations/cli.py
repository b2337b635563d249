"""The installed ``fedft`` command: fedft's own subcommands plus ``simulate``.

``simulate`` lives here rather than in ``fedft/cli.py`` because it starts Flower, and the
``fedft`` library never imports flwr. The installed command runs ``console_main``.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from pathlib import Path

from clients.supernode import DEFAULT_POLL_S, MAX_POLL_S, MIN_POLL_S
from simulations.commands import (
    add_config_arguments,
    build_parser,
    config_from_args,
    run,
)


def _simulate(args: argparse.Namespace) -> int:
    from simulations.runner import simulate
    from simulations.sweeps import simulate_epsilons, simulate_seeds

    cfg = config_from_args(args)
    if args.seeds is not None:
        return simulate_seeds(cfg, args)
    if args.epsilons is not None:
        return simulate_epsilons(cfg, args)
    simulate(cfg, Path(args.out), verbose=args.verbose, resume=args.resume, overwrite=args.overwrite)
    return 0


def _node_serve(args: argparse.Namespace) -> int:
    from flwr.common.config import parse_config_args

    from clients.worker import WorkerError, serve

    node_config = parse_config_args([args.node_config]) if args.node_config else {}
    try:
        if "worker" in node_config:
            raise WorkerError("--node-config: 'worker' belongs in the SuperNode's node config, not the worker's")
        serve(Path(args.socket), node_config)
    except WorkerError as error:
        print(f"fedft: error: {error}", file=sys.stderr)
        return 2
    return 0


def _node_supernode(args: argparse.Namespace) -> int:
    from clients.supernode import LauncherError, run_supernode

    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    try:
        run_supernode(flower_args, args.poll_interval)
    except LauncherError as error:
        print(f"fedft: error: {error}", file=sys.stderr)
        return 2
    return 0


def _add_node_commands(commands) -> None:
    node = commands.add_parser("node", help="an institution's own processes beside its SuperNode")
    node_commands = node.add_subparsers(dest="node_command", required=True)
    serve = node_commands.add_parser(
        "serve", help="a resident worker that keeps the 4-bit base loaded between rounds",
        description="Start it beside the SuperNode, with the node config the SuperNode would have had "
                    "(data-path, state-dir, policy, device, model-path, ...); start the SuperNode with only "
                    "--node-config \"worker='SOCKET'\". Rounds the ClientApp forwards run here, the base "
                    "loaded once.")
    serve.add_argument("--socket", required=True, help="the Unix socket to listen on (created mode 0600)")
    serve.add_argument("--node-config", default="",
                       help="this institution's settings, as for flower-supernode: \"data-path='...' ...\"")
    serve.set_defaults(handler=_node_serve)
    supernode = node_commands.add_parser(
        "supernode", help="Flower's SuperNode, asking for the next message every --poll-interval s (Flower: 3 s)",
        description="Runs flower-supernode with the arguments after '--', unchanged (TLS, authentication, node "
                    "config), but when no message is waiting it asks the SuperLink again after --poll-interval "
                    "seconds instead of 3, and it looks for the ClientApp's reply and for a ClientApp to start "
                    "as often. Each round then waits less between the coordinator's message and the training.")
    supernode.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S, metavar="SECONDS",
                           help=f"the longest wait between two polls ({MIN_POLL_S} to {MAX_POLL_S}; "
                                f"default {DEFAULT_POLL_S})")
    supernode.add_argument("flower_args", nargs=argparse.REMAINDER,
                           help="-- then flower-supernode's own arguments")
    supernode.set_defaults(handler=_node_supernode)


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    _add_node_commands(commands)
    sim = commands.add_parser("simulate", help="run a config on Flower's Simulation Engine")
    add_config_arguments(sim)
    sim.add_argument("--out", required=True, help="the run directory (RUN_DIR)")
    sim.add_argument("--verbose", action="store_true",
                     help="also show third-party output: Flower's and Ray's logs, library warnings, progress bars")
    sim.add_argument("--resume", action="store_true",
                     help="continue RUN_DIR after its latest complete checkpoint (same config)")
    sim.add_argument("--overwrite", action="store_true",
                     help="replace the run already in RUN_DIR (moved aside in one rename, then removed whole); "
                          "without it a non-empty RUN_DIR is refused")
    sweep = sim.add_mutually_exclusive_group()
    sweep.add_argument("--seeds", metavar="0,1,2",
                     help="run the config once per seed (OUT/seed-N) and write OUT/seeds.json: mean, standard "
                          "deviation and each seed's final exact match (a range such as 0-4 works too)")
    sweep.add_argument("--epsilons", metavar="1,2,4,8,16,off",
                       help="run the config once per record-level epsilon (DP-SGD calibrated to each; off: without any "
                            "DP) in OUT/epsilon-E and OUT/no-dp, then write the privacy-utility curve: "
                            "OUT/privacy_utility.json and .png")
    sim.set_defaults(handler=_simulate)
    return run(parser, argv)


def console_main() -> None:
    """``main``, then leave without the interpreter's teardown of its modules (0.5 s once torch and
    transformers are imported, as after ``fedft simulate``): exit handlers still run (``atexit``,
    which also removes temporary directories) and output is flushed; while another thread of the
    command still runs, the interpreter exits as usual (it waits for it)."""
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter's own exit would run first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
