"""The run directory: every file a run leaves, its name, the atomic writes that put it there and
the readers that read it back.

A reader (or a crash) never sees a half-written checkpoint, metrics file, ledger or summary:
each write goes to a temporary sibling, is fsync'd and moved into place with ``os.replace``,
and the directory holding it is fsync'd after the rename, so a power cut leaves the old file
or the new one, never an empty one.
Every layer that writes into RUN_DIR takes the file's name from here; ``read_jsonl_rows``
reads its JSON-lines files back, naming file:line for a bad line. Nothing here trains,
loads a model or imports flwr.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fedft.config import ConfigError, FedftConfig, config_from_dict

METRICS_FILE = "metrics.jsonl"  # one row per round
SUMMARY_FILE = "summary.json"  # base and final metrics, totals, the resolved config
CURVES_FILE = "curves.png"
EVALUATION_FILE = "evaluation.json"  # every stage scored on the same held-out data
ADAPTER_DIR = "adapter"  # the final SFT adapter (PEFT format); local-only runs: adapter/clientN/
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/round-NNN/
CHECKPOINT_META = "round.json"  # written last into a checkpoint: {"round": N}
DPO_ADAPTER_DIR = "dpo/adapter"  # the DPO stage's adapter (PEFT format)
CANARY_AUDIT_FILE = "canary_audit.json"
FAILURE_FILE = "failed.json"  # why the run's last attempt ended in an error (removed when a resumed run finishes)


class RunDirError(ValueError):
    """A run directory is missing something it should hold, holds something unreadable, or
    cannot be used for a new run (in use, not empty, not writable)."""


class RunFailed(RuntimeError):
    """A run started but could not finish (e.g. too few clients replied); the message says why.
    RUN_DIR keeps what was done: the checkpoints of every complete round."""


class DiskFull(RunDirError):
    """A write into the run directory ran out of space; what was there before is intact."""


def _no_space(error: BaseException) -> bool:
    """True for an out-of-space error, whether raised as OSError or by safetensors' writer."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


@contextlib.contextmanager
def _named_if_full(target: Path) -> Iterator[None]:
    """Re-raise an out-of-space error as ``DiskFull`` naming the file or directory being written."""
    try:
        yield
    except BaseException as error:
        if _no_space(error):
            raise DiskFull(f"no space left on the device holding {target} while writing it (the previous "
                           "version, if any, is intact); free space, then run again (--resume continues a run)"
                           ) from error
        raise


def checkpoint_dir(run_dir: Path, round_index: int) -> Path:
    """RUN_DIR/checkpoints/round-NNN."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"round-{round_index:03d}"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then each directory in it (deepest first)."""
    directory = Path(directory)
    for path in directory.rglob("*"):
        if path.is_file():
            fsync_path(path)
    for path in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(path)
    fsync_path(directory)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    candidates = sorted(Path(run_dir).glob(f"{CHECKPOINTS_DIR}/round-*/{CHECKPOINT_META}"))
    return candidates[-1].parent if candidates else None


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (fsync'd temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with _named_if_full(path), os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself survives a power cut
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def jsonl_text(rows: list[dict]) -> str:
    """``rows`` as JSON lines (sorted keys), the form every fedft .jsonl file has."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def record_failure(run_dir: Path, error: str, message: str) -> None:
    """failed.json (``fedft status`` reads it): why the run's last attempt ended. Best effort: a disk
    too full to take it must not replace the run's own error, so a refused write is skipped."""
    record = {"error": error, "message": message, "time": time.time()}
    with contextlib.suppress(OSError, RunDirError):
        atomic_write_json(Path(run_dir) / FAILURE_FILE, record)


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    """Rewrite a JSON-lines file with ``rows``, atomically."""
    atomic_write_text(path, jsonl_text(rows))


def read_jsonl_rows(path: Path) -> list[dict]:
    """Rows of a JSON-lines file written by ``atomic_write_jsonl`` (empty if absent).

    Blank lines are skipped; a line that is not JSON raises ``RunDirError`` naming file:line.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RunDirError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from err
    return rows


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target`` in one rename.

    An existing ``target`` is moved aside first and removed only after the new one is in
    place, so at every moment a complete copy exists on disk.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        with _named_if_full(target):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)  # every file's data is on disk before the directory appears
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_tensors_atomic(tensors: dict, path: Path) -> None:
    """Write a safetensors file atomically (temp file in the same directory + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        with _named_if_full(path):
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        fsync_path(Path(tmp))
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise



def load_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return read_jsonl_rows(Path(run_dir) / METRICS_FILE)


def load_summary(run_dir: Path) -> dict:
    """A run's summary.json."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a finished fedft run?")
    return json.loads(path.read_text())


def load_run_config(run_dir: Path) -> FedftConfig:
    """The resolved config a run recorded in its summary.json."""
    summary = load_summary(run_dir)
    path = Path(run_dir) / SUMMARY_FILE
    raw = summary.get("config")
    if not isinstance(raw, dict):
        raise RunDirError(f"{path} has no 'config' table: was it written by fedft?")
    try:
        return config_from_dict(raw, source=str(path))
    except ConfigError as err:
        raise RunDirError(f"the config recorded in {path} is not valid for this fedft: {err}") from err


def write_evaluation(out_dir: Path, evaluation: dict) -> Path:
    """``out_dir/evaluation.json``, atomically."""
    path = Path(out_dir) / EVALUATION_FILE
    atomic_write_json(path, evaluation)
    return path
