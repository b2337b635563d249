"""A ``flwr-clientapp`` command that starts 0.35 s sooner: Flower's own, without its CLI package.

Flower's SuperExec runs the command ``flwr-clientapp`` (found on ``PATH``) once for every
message a SuperNode receives. Flower's script imports ``flwr.supernode.cli``, whose
``__init__`` also imports the whole ``flower-supernode`` command line, although the process
only needs ``flwr_clientapp()``: on 2 cores that is about 0.9 s of imports against 0.5 s
(``python -c "import flwr.supernode.cli"``), paid every round.

``fedft node supernode`` writes a script of that name (``write_command``) into a private
directory (mode 0700) and puts it first on the ``PATH`` its SuperExec inherits. The script
runs the same function from the same file of the installed Flower
(``flwr/supernode/cli/flwr_clientapp.py``), loaded on its own: the arguments, the token, TLS
and the ClientApp it runs are Flower's, unchanged. Where that file or function is missing
(another Flower), ``load_flower_clientapp`` raises and the launcher leaves ``PATH`` alone.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable, MutableMapping

COMMAND_NAME = "flwr-clientapp"  # Flower checks that argv[0] ends with it (flwr/supercore/exit/exit.py)
FLOWER_SCRIPT = ("cli", "flwr_clientapp.py")  # under the flwr.supernode package
FLOWER_FUNCTION = "flwr_clientapp"


class CommandUnavailable(Exception):
    """The installed Flower has no ``flwr_clientapp()`` where this command expects it."""


def load_flower_clientapp() -> Callable[[], None]:
    """Flower's ``flwr_clientapp()`` loaded from its file, without importing ``flwr.supernode.cli``."""
    import flwr.supernode

    path = Path(flwr.supernode.__path__[0], *FLOWER_SCRIPT)
    spec = importlib.util.spec_from_file_location("fedft_flower_clientapp_command", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise CommandUnavailable(f"no {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function = getattr(module, FLOWER_FUNCTION, None)
    if not callable(function):
        raise CommandUnavailable(f"{path} has no {FLOWER_FUNCTION}()")
    return function


def write_command(directory: Path) -> Path:
    """Write the ``flwr-clientapp`` script into ``directory`` (owner-only) and return its path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    script = directory / COMMAND_NAME
    script.write_text(f"#!{sys.executable}\n"
                      "import sys\n"
                      "from clients.clientapp_command import main\n"
                      "sys.exit(main())\n")
    script.chmod(stat.S_IRWXU)
    return script


def check_command(script: Path, timeout_s: float = 120) -> None:
    """Run ``script --help`` once, so a directory that cannot execute (noexec) is found at start."""
    try:
        done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=timeout_s)
    except OSError as error:
        raise CommandUnavailable(f"{script} cannot run: {error.strerror}") from None
    except subprocess.TimeoutExpired:
        raise CommandUnavailable(f"{script} --help did not finish in {timeout_s:.0f} s") from None
    if done.returncode != 0 or "--runtime-api-address" not in done.stdout:
        raise CommandUnavailable(f"{script} --help exited {done.returncode}")


def prepend_to_path(directory: Path, environ: MutableMapping[str, str] = os.environ) -> None:
    environ["PATH"] = os.pathsep.join([str(directory), *filter(None, [environ.get("PATH", "")])])


def main() -> None:
    load_flower_clientapp()()


if __name__ == "__main__":
    main()
