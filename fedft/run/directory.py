"""Claiming a run directory: one run at a time, no silent replacement, refusals that change nothing.

``claimed_run_dir(out, resume=..., overwrite=...)`` is held for the life of a run (simulation,
baseline or deployment ServerApp). Before it touches anything it refuses: a path that is a
file, a directory another fedft run holds (its pid and host are named), and a directory that
already holds a run unless the run is resumed or ``overwrite`` replaces it. Replacing moves
the old run aside in one rename and removes it whole, never part of it. While the run lasts
an exclusive ``flock`` on ``RUN_DIR/.fedft.lock`` keeps a second run out; the lock goes with
the process, so a killed run never leaves the directory locked. No training, no flwr.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from fedft.rundir import RunDirError

LOCK_FILE = ".fedft.lock"


def lock_holder(out: Path) -> str | None:
    """'pid N on HOST' when another process holds ``out``'s lock, else None (changes nothing)."""
    path = Path(out) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return path.read_text().strip() or "another process"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _existing_run(out: Path) -> list[str]:
    """The names in ``out`` other than its lock file (empty when there is no run)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)


def _check(out: Path, resume: bool, overwrite: bool) -> list[str]:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose a directory")
    holder = lock_holder(out)
    if holder:
        raise RunDirError(f"--out {out} is in use by another fedft run ({holder}); wait for it to end "
                          "or choose another --out")
    names = _existing_run(out)
    if names and not (resume or overwrite):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise RunDirError(f"--out {out} already holds a run ({shown}); --resume continues it, --overwrite "
                          "replaces it, or choose another --out (nothing was changed)")
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; choose one")
    parent = out.parent if not out.exists() else out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise RunDirError(f"--out {out}: {parent} is not writable")
    return names


def _lock(out: Path) -> int:
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"--out {out} was claimed by another fedft run a moment ago; choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


@contextlib.contextmanager
def claimed_run_dir(out: Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``out`` for one run: checked first (refusals change nothing), then locked until the end."""
    out = Path(out)
    names = _check(out, resume, overwrite)
    aside = None
    if names and overwrite:
        aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(out, aside)  # one rename: the old run is whole until it is removed whole
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"--out {out}: cannot create it ({err.strerror})") from None
    fd = _lock(out)
    if not (resume or overwrite) and _existing_run(out):  # another run finished here between check and lock
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise RunDirError(f"--out {out} already holds a run, written by another fedft run a moment ago; choose "
                          "another --out (nothing was changed)")
    try:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        yield out
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
