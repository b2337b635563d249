"""The installed ``fedft`` command: fedft's own subcommands plus ``simulate``.

``simulate`` lives here rather than in ``fedft/cli.py`` because it starts Flower, and the
``fedft`` library never imports flwr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulations.commands import (
    add_config_arguments,
    build_parser,
    config_from_args,
    run,
)


def _simulate(args: argparse.Namespace) -> int:
    from simulations.runner import simulate

    cfg = config_from_args(args)
    simulate(cfg, Path(args.out), verbose=args.verbose, resume=args.resume, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
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
    sim.set_defaults(handler=_simulate)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
