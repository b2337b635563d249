"""The fedft Flower ServerApp (thin): read the config, run the federation loop.

Under ``flwr run .`` the run config (``[tool.flwr.app.config]`` in pyproject.toml, or
``--run-config``) names the fedft TOML file (``config``), optional ``overrides``
(space-separated ``section.key=value``), the output directory (``out-dir``), and
``resume=true`` (continue after the latest complete checkpoint in out-dir, e.g. after a
coordinator crash) or ``overwrite=true`` (replace a finished run there).
``fedft simulate`` builds the same app around an already-loaded config.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedft.config import ConfigError, FedftConfig, load_config
from fedft.model.files import check_model_files
from fedft.run.directory import claimed_run_dir


def make_server_app(cfg: FedftConfig, out_dir: Path, resume: bool = False, outcome: dict | None = None,
                    before_run: Callable[[], bool] | None = None,
                    after_run: Callable[[dict], None] | None = None) -> ServerApp:
    """A ServerApp bound to a loaded config (used by the simulation runner).

    ``outcome`` receives the run's ``summary`` or the ``error`` that ended it; the runner, in
    the same process, raises that error itself (so ``fedft simulate`` exits non-zero with one
    line) rather than leaving it to Flower's log. ``before_run``, called first in the
    ServerApp's thread, may wait (the engine starts its client actors meanwhile); when it
    returns False the ServerApp returns at once and touches nothing (``outcome`` gets
    ``refused``). ``after_run`` is called with ``outcome`` once a run that started has ended
    (with its summary or its error); it needs ``outcome``.
    """
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        from server.federation import run_federation  # torch: imported here, so the engine starts sooner

        if before_run is not None and not before_run():
            if outcome is not None:
                outcome["refused"] = True
            return
        if outcome is None:
            run_federation(grid, cfg, out_dir, resume=resume)
            return
        try:
            outcome["summary"] = run_federation(grid, cfg, out_dir, resume=resume)
        except Exception as error:  # noqa: BLE001 - handed to the runner, which raises it
            outcome["error"] = error
        if after_run is not None:
            after_run(outcome)

    return bound


APP_DIR = Path(__file__).resolve().parent.parent
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the fedft config comes from the run config."""
    from fedft.run.resume import load_resume_point
    from server.federation import run_federation  # torch and the model libraries: imported on use

    run_config = context.run_config
    overrides = shlex.split(str(run_config.get("overrides", "")))
    config_path = Path(str(run_config["config"]))
    if not config_path.is_absolute():  # relative to the app (where pyproject.toml is)
        config_path = APP_DIR / config_path
    cfg = load_config(config_path, overrides)
    check_model_files(cfg.model_path)
    out_dir = Path(str(run_config.get("out-dir", "runs/flwr-run"))).resolve()
    resume, overwrite = _flag(run_config, "resume"), _flag(run_config, "overwrite")
    if resume:
        load_resume_point(out_dir, cfg)  # a refused resume changes nothing
    with claimed_run_dir(out_dir, resume=resume, overwrite=overwrite):
        run_federation(grid, cfg, out_dir, resume=resume)


def _flag(run_config, key: str) -> bool:
    """A boolean run-config key (``--run-config "resume=true"``)."""
    value = run_config.get(key, False)
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"--run-config {key} = {value!r}: expected true or false")
        return value.lower() == "true"
    return bool(value)
