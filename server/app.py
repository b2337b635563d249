"""The fedft Flower ServerApp (thin): read the config, run the federation loop.

Under ``flwr run .`` the run config (``[tool.flwr.app.config]`` in pyproject.toml, or
``--run-config``) names the fedft TOML file (``config``), optional ``overrides``
(space-separated ``section.key=value``) and the output directory (``out-dir``).
``fedft simulate`` builds the same app around an already-loaded config.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedft.config import FedftConfig, load_config
from server.federation import run_federation


def make_server_app(cfg: FedftConfig, out_dir: Path, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a loaded config (used by the simulation runner)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, out_dir, resume=resume)

    return bound


APP_DIR = Path(__file__).resolve().parent.parent
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the fedft config comes from the run config."""
    run_config = context.run_config
    overrides = shlex.split(str(run_config.get("overrides", "")))
    config_path = Path(str(run_config["config"]))
    if not config_path.is_absolute():  # relative to the app (where pyproject.toml is)
        config_path = APP_DIR / config_path
    cfg = load_config(config_path, overrides)
    run_federation(grid, cfg, Path(str(run_config.get("out-dir", "runs/flwr-run"))).resolve())
