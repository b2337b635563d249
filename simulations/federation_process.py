"""``fedft simulate``'s federation in a child process group, so Ctrl-C and SIGTERM stop it cleanly.

Ray replaces the signal handlers of the process that starts it, and on SIGTERM its driver
aborted a few seconds later (exit -6) with its helper processes left running. The
federation (Flower's Simulation Engine with fedft's ServerApp and ClientApp) therefore runs
in a child process in its own process group; this process keeps the run directory's lock
and the signals. Ctrl-C or SIGTERM is forwarded to the child as SIGINT (the run loop stops
where it is: every complete round is already checkpointed), the child gets ``GRACE_S``
seconds, then its whole group is killed; at the end the child's group (Ray's agents stay
in it but drop the token) and every process that carries this run's token in its
environment (the child, Ray's raylet, GCS and workers, which inherit it) are killed, so
nothing outlives the command. If this process is killed outright, the
kernel kills the child with it (PR_SET_PDEATHSIG). The child reports how it ended in a small
JSON file.

The child starts before the run's checks (``FederationChild``): a run's start-up is Ray's start,
then each Ray actor importing torch, transformers, peft and bitsandbytes and loading its base,
and all of it overlaps the checks and the server's own load.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

TOKEN_VAR = "FEDFT_RUN_TOKEN"  # inherited by every process the federation starts
GRACE_S = 30.0  # after the forwarded Ctrl-C, before the child's group is killed
GO = b"go\n"  # what the prepared child waits for on its stdin before it runs the federation


class Interrupted(KeyboardInterrupt):
    """The run was stopped by Ctrl-C or SIGTERM; the run directory keeps every complete round."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def processes_with_token(token: str, *, prefix: bool = False) -> list[int]:
    """Pids of the processes whose environment carries ``TOKEN_VAR=token`` (or a token starting with
    ``token`` when ``prefix``), from Linux /proc."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v == needle or (prefix and v.startswith(needle)) for v in variables):
            found.append(int(entry.name))
    return found


def kill_token_holders(token: str) -> int:
    """SIGKILL every process of this run still alive; returns how many there were."""
    pids = processes_with_token(token)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


class FederationChild:
    """The federation's process, started before the run's checks so that its slow start overlaps them.

    While this process reads and tokenizes the data, it starts Ray, then Flower's Simulation
    Engine, whose client actors load their base at once, while fedft's ServerApp loads the
    server's base and waits: ``go`` lets the ServerApp run the federation, ``cancel`` (a refused
    run, an error, Ctrl-C before ``go``) stops it and every process it started. Before ``go`` it
    touches nothing in the run directory. Once the run's files are written it leaves without
    stopping Ray (about 2.5 s); ``kill_all`` then stops what is left.
    """

    def __init__(self, cfg, out_dir: Path, *, resume: bool, verbose: bool) -> None:
        from fedft.config import config_to_dict

        # always fresh: a token inherited from an outer process (a wrapper running several fedft commands) only
        # prefixes it, so cleaning up this run can never kill another run or the wrapper itself
        self.token = "-".join(t for t in (os.environ.get(TOKEN_VAR), secrets.token_hex(8)) if t)
        self.out_dir = Path(out_dir)
        self._scratch = tempfile.TemporaryDirectory(prefix="fedft-federation-")
        scratch = Path(self._scratch.name)
        spec, self.result = scratch / "spec.json", scratch / "result.json"
        spec.write_text(json.dumps({"config": config_to_dict(cfg), "out_dir": str(out_dir), "resume": resume,
                                    "verbose": verbose, "result": str(self.result)}))
        command = [sys.executable, "-m", "simulations.federation_process", str(spec), str(os.getpid())]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, env={**os.environ, TOKEN_VAR: self.token},
                                        start_new_session=True)

    def __enter__(self) -> FederationChild:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def go(self) -> None:
        """Let the prepared child run the federation."""
        try:
            self.process.stdin.write(GO)
            self.process.stdin.close()
        except (BrokenPipeError, OSError):  # the child already ended: its outcome file says why
            pass

    def cancel(self) -> None:
        """Stop the child (if it still runs) and every process of this run; remove its scratch files."""
        self.kill_all()
        if not self.process.stdin.closed:
            self.process.stdin.close()
        self._scratch.cleanup()

    def kill_all(self) -> None:
        """SIGKILL the child's process group (Ray's agents stay in it but drop the token from their
        environment), reap the child, and SIGKILL every process carrying this run's token.

        The group is signalled only while the child is not yet reaped (``_wait`` leaves it a zombie):
        until then its pid, and so the group's id, cannot belong to another process."""
        if self.process.returncode is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # the group outlives its leader while members remain
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
        kill_token_holders(self.token)


def run_federation_in_child(child: FederationChild) -> dict:
    """Let the prepared federation process run (``FederationChild``, started before the run's
    checks), wait for it and return summary.json's contents. The caller's ``with child`` stops
    whatever is left of it afterwards.

    Raises ``Interrupted`` after Ctrl-C / SIGTERM, ``RunFailed`` when the federation failed.
    """
    from fedft.rundir import RunFailed, load_summary

    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        received.append(signum)
        try:
            os.killpg(child.process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        child.go()
        if not _wait(child.process, received):
            print(f"fedft: the federation did not stop within {GRACE_S:.0f} s of the signal; its processes "
                  "were killed", file=sys.stderr)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        child.kill_all()
    returncode = child.process.returncode
    if received:
        if not (returncode == 0 and (child.out_dir / "summary.json").is_file()):
            record_interruption(child.out_dir, received[0])
            raise Interrupted(received[0])
    outcome = json.loads(child.result.read_text()) if child.result.is_file() else {}
    if outcome.get("error"):
        raise _reraised(outcome["error"], outcome["message"])
    if returncode != 0 or not outcome.get("ok"):
        raise RunFailed(f"the simulation process ended with exit code {returncode} before the run finished; "
                        f"{child.out_dir} keeps every complete round (--resume continues it)")
    return load_summary(child.out_dir)


def _reraised(name: str, message: str) -> Exception:
    """The child's error as the parent raises it: a user error keeps its type (the command exits 2 with
    its one line); anything else is the run failing (exit 1)."""
    from fedft.config import ConfigError
    from fedft.data.files import DataError
    from fedft.data.partition import PartitionError
    from fedft.model.quantization import QuantizationError
    from fedft.rundir import RunFailed

    user_errors = {cls.__name__: cls for cls in (ConfigError, DataError, PartitionError, QuantizationError)}
    if name in user_errors:
        return user_errors[name](message)
    return RunFailed(message if name in ("RunFailed", "FederationError") else f"{name}: {message}")


def _die_with_parent(parent: int) -> None:
    """The child, first thing: the kernel sends it SIGKILL if ``parent`` dies (even by SIGKILL), so a
    killed ``fedft simulate`` never leaves a federation writing into its run directory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(137)


def _has_exited(pid: int) -> bool:
    """Whether the child ``pid`` has exited, without reaping it (``waitid`` with ``WNOWAIT``)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def record_interruption(out_dir: Path, signum: int) -> None:
    """failed.json for ``fedft status``: stopped by a signal, every complete round kept."""
    from fedft.rundir import record_failure

    if Path(out_dir).is_dir():
        record_failure(out_dir, "Interrupted", f"stopped by {signal.Signals(signum).name}")


def _wait(child: subprocess.Popen, received: list[int]) -> bool:
    """Until the child exits (left unreaped, so its group's id stays its own: ``kill_all``); after a
    forwarded signal at most ``GRACE_S`` more, then kill its group. False when the group had to be killed."""
    deadline = None
    while not _has_exited(child.pid):
        if received and deadline is None:
            deadline = time.monotonic() + GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
            return False
        time.sleep(0.2)
    return True


def prepare_federation(cfg, scratch: Path, *, verbose: bool) -> None:
    """What the federation needs before Flower's engine starts, done while the parent still checks
    the run: Ray started first (its workers warm up as they start: simulations/ray_cluster.py),
    then Flower and fedft's apps imported. ``scratch`` is a directory of this run's own (the
    workers claim their warm-ups there) that outlives the federation's process."""
    from simulations import console
    from simulations.ray_cluster import start_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    start_ray(cfg, scratch)  # before Flower's engine, which then uses it; Ray's start is the longest step here
    import flwr.simulation  # noqa: F401 - the slow imports, done before the parent's go

    from simulations import engine_wakeup

    engine_wakeup.install()  # the engine takes each round's messages as they are stored, not up to 100 ms later

    import clients.app  # noqa: F401
    import server.app  # noqa: F401 - light: it imports torch and the model libraries only when it runs

    if not verbose:  # importing flwr set its logger to DEBUG
        console.quiet_loggers()


def load_server_base(cfg) -> None:
    """The server's copy of the base, into the cache where the ServerApp's evaluator finds it. A base
    that fails to load here is loaded again by the ServerApp, which reports the error."""
    try:
        from fedft.model.load import cached_peft_model, model_spec

        cached_peft_model(model_spec(cfg))
    except Exception:  # noqa: BLE001 - the ServerApp's own load reports it
        pass


def run_federation_here(cfg, out_dir: Path, scratch: Path, *, verbose: bool, resume: bool,
                        before_run: Callable[[], bool] | None = None,
                        after_run: Callable[[dict], None] | None = None) -> dict | None:
    """Flower's Simulation Engine with fedft's ServerApp and ClientApp, in this process.

    ``before_run`` runs first in the ServerApp's thread while the engine starts its client actors
    (which load their base meanwhile); when it returns False the run is refused and this returns
    None. ``after_run`` gets the ServerApp's outcome as soon as the run has ended. ``scratch``: as
    for ``prepare_federation``.
    """
    prepare_federation(cfg, scratch, verbose=verbose)  # Ray first, then the imports below are cached ones
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fedft.rundir import RunFailed
    from server.app import make_server_app

    backend_config = {
        "client_resources": {
            "num_cpus": cfg.simulation.num_cpus,
            "num_gpus": cfg.simulation.num_gpus,
        },
    }
    outcome: dict = {}
    run_simulation(
        server_app=make_server_app(cfg, out_dir, resume=resume, outcome=outcome, before_run=before_run,
                                   after_run=after_run),
        client_app=client_app,
        num_supernodes=cfg.simulation.num_supernodes,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if outcome.get("refused"):
        return None
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise RunFailed(f"the simulation ended before the run finished; {out_dir} keeps every complete round "
                        "(see the log above; --resume continues it)")
    return outcome["summary"]


def _stop_quietly(signum, frame):  # noqa: ARG001 - signal handler signature
    """The forwarded Ctrl-C in the child: Flower's and Ray's threads, cut off mid-message, would log
    tracebacks; the parent prints the one line that matters."""
    import logging

    for name in ("flwr", "ray", "opacus", "transformers"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    raise KeyboardInterrupt


def _child_main(spec_path: str, parent: int) -> int:
    """The child: prepare, start Flower's engine (its client actors load their base), load the server's
    base, wait for the parent's go, run the federation, write how it ended."""
    _die_with_parent(parent)
    from fedft.config import config_from_dict

    spec = json.loads(Path(spec_path).read_text())
    result = Path(spec["result"])
    if not spec["verbose"]:
        signal.signal(signal.SIGINT, _stop_quietly)

    def load_then_wait_for_go() -> bool:
        load_server_base(cfg)
        return sys.stdin.buffer.readline() == GO  # else the parent refused the run; it stops Ray's processes

    def leave_when_done(outcome: dict) -> None:
        if "summary" in outcome:  # every file of the run is written: leave without stopping Ray (~2.5 s);
            _leave_ok(result)     # the parent kills every process of this run that is still alive

    try:
        cfg = config_from_dict(spec["config"])
        if run_federation_here(cfg, Path(spec["out_dir"]), Path(spec_path).parent, resume=spec["resume"],
                               verbose=spec["verbose"], before_run=load_then_wait_for_go,
                               after_run=leave_when_done) is None:
            return 0  # refused
    except KeyboardInterrupt:
        # Flower's ServerApp thread (fedft's run loop) is not a daemon: a normal exit would wait for it
        # to finish its round, and the parent would kill the group after GRACE_S. Every complete round is
        # already checkpointed (atomic writes), so the process leaves now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
        result.write_text(json.dumps({"error": type(error).__name__, "message": str(error)}))
        return 1
    _leave_ok(result)  # after_run has left already when the run wrote its summary


def _leave_ok(result: Path) -> NoReturn:
    """Write the outcome file and leave without the interpreter's teardown (Ray's and torch's exit
    handlers: about 4 s on 2 cores): every file of the run is written (atomically) and the parent
    reads the outcome file and kills any process of this run still alive."""
    result.write_text(json.dumps({"ok": True}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    code = _child_main(sys.argv[1], int(sys.argv[2]))
    sys.stdout.flush()  # then leave without the interpreter's teardown, as _leave_ok does
    sys.stderr.flush()
    os._exit(code)
