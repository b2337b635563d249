"""The processes the overhead benchmark (simulations/bench.py) times: ``fedft simulate``, the plain
transformers + peft loop, and one ``flwr run`` job on a local SuperLink and SuperNode (with or
without the institution's resident worker). Each returns what was measured as a dict."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from simulations.bench_figures import BenchError, Settings
from simulations.bench_processes import (
    Processes,
    TreeSampler,
    free_port,
    log_text,
    port_open,
    tail,
    tool,
    wait_for,
    wait_until,
)
from simulations.node_commands import supernode_command

REPO_ROOT = Path(__file__).resolve().parent.parent


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise BenchError(f"{path} is missing: the run did not record its rounds")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_simulation(procs: Processes, config: Path, out: Path, name: str, timeout_s: float,
                   verbose: bool = False) -> dict:
    """``fedft simulate`` as a subprocess: wall time, metrics rows, console, peak RSS (and, with
    ``verbose``, PSS) of its process tree."""
    args = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config), "--out", str(out)]
    with TreeSampler(procs, pss=verbose) as sampler:
        started = time.monotonic()
        process, log = procs.start(name, args + (["--verbose"] if verbose else []))
        wait_for(process, log, f"the simulation ({name})", timeout_s)
        wall = time.monotonic() - started
    procs.stop_all()  # Ray's helpers, should any outlive the driver
    return {"wall_s": wall, "rows": metrics_rows(out), "console": log_text(log),
            "peak_rss": sampler.peak_rss, "peak_pss": sampler.peak_pss, "peak_processes": sampler.peak_processes,
            "ray_actors": sampler.count("ray::ClientAppActor")}


def run_plain(procs: Processes, config: Path, out: Path, timeout_s: float) -> dict:
    """The plain loop (``bench_plain.plain_loop``) in its own process, as the simulation runs in its own."""
    started = time.monotonic()
    process, log = procs.start("plain-loop", [sys.executable, "-m", "simulations.bench", "--plain-loop",
                                              str(config), "--out", str(out)])
    wait_for(process, log, "the plain transformers + peft loop", timeout_s)
    result = json.loads(out.read_text())
    result["wall_s"] = time.monotonic() - started
    return result


def start_superlink(procs: Processes) -> int:
    """A SuperLink without TLS or SuperNode authentication, and ``flwr``'s connection "bench" to it."""
    port = free_port()
    process, log = procs.start("superlink", [tool("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                             "--port", str(port), "--disable-runtime-dependency-installation"])
    wait_until(lambda: port_open(port), process, log, "the SuperLink")
    (procs.root / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    return port


def supernode_online(procs: Processes) -> bool:
    listed = subprocess.run([tool("flwr"), "supernode", "list", "bench", "--format", "json"], cwd=REPO_ROOT,
                            env=procs.env, capture_output=True, text=True, timeout=60)
    return '"online"' in listed.stdout


def run_deployment(procs: Processes, s: Settings, config: Path, data: Path, *, worker: bool,
                   poll_s: float | None = None) -> dict:
    """One job of ``flwr run`` on a fresh local SuperLink and one SuperNode (``flower-supernode``, or with
    ``poll_s`` ``fedft node supernode --poll-interval poll_s``); every process stopped after."""
    name = ("deploy-worker" if worker else "deploy-plain") + ("-fastpoll" if poll_s is not None else "")
    out = procs.root / name  # the job's out-dir: the ServerApp's run directory
    port = start_superlink(procs)
    own = f"data-path='{data}' device='{s.device}'"
    worker_log = None
    if worker:
        sock = procs.root / f"{name}.sock"
        process, worker_log = procs.start(f"{name}-worker", [sys.executable, "-m", "simulations.cli", "node", "serve",
                                                             "--socket", str(sock), "--node-config", own])
        wait_until(sock.exists, process, worker_log, "the resident worker")
        own = f"worker='{sock}'"
    launcher = supernode_command(tool("flower-supernode"), poll_s)
    process, node_log = procs.start(f"{name}-supernode", [
        *launcher, "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
        "--node-config", own])
    wait_until(lambda: supernode_online(procs), process, node_log, "the SuperNode", timeout_s=120)
    with TreeSampler(procs) as sampler:
        run, run_log = procs.start(f"{name}-flwr-run", [tool("flwr"), "run", ".", "bench", "--stream", "--run-config",
                                                        f"config='{config}' out-dir='{out}'"])
        wall = wait_for(run, run_log, f"flwr run ({name})", s.timeout_s)
    procs.stop_all()
    if not (out / "summary.json").is_file():
        logs = "\n".join(f"--- {p.name}\n{tail(p, 1500)}" for p in (run_log, node_log, worker_log) if p)
        raise BenchError(f"the {name} job did not finish (no {out / 'summary.json'}):\n{logs}")
    return {"wall_s": wall, "rows": metrics_rows(out), "node_log": log_text(node_log),
            "worker_log": log_text(worker_log) if worker_log else "",
            "clientapp_processes": sampler.count("flwr-clientapp"), "peak_rss": sampler.peak_rss}
