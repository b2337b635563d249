"""The Ray cluster under ``fedft simulate``: started by fedft, sized to the run, its workers warmed.

Flower's Simulation Engine starts Ray itself unless Ray is already running in the process;
fedft starts it first, with the same settings Flower would use (no dashboard, the driver's
``sys.path`` as every worker's ``PYTHONPATH``) and two more:

- **CPUs**: Ray gets the CPUs the run's clients can use at once (``ray_cpus``): every
  simulated client at ``simulation.num_cpus`` each, at most the machine's cores. Flower
  builds one actor per ``simulation.num_cpus`` CPUs Ray has, so a run with fewer simulated
  clients than cores no longer starts actors that never train (each one a Python process
  importing Flower, and with the warm-up below, torch and the base).
- **Warm-up**: a Ray worker process, as it starts, imports the client's libraries (torch,
  transformers, peft, bitsandbytes) and loads the run's 4-bit base and its data split into
  this process's caches (``warm_worker``), the same ones a client's first round uses. Ray
  starts one worker per CPU while ``ray.init`` is still running, before Flower exists in
  the process; Flower's client actors then take those workers. The warm-up runs as Ray
  preloads a module into each of them (``simulations.ray_warm``, Ray's
  ``preload_python_modules``): it starts seconds before Flower asks for its actors, and
  overlaps the run's checks, Flower's start and the server's own load. The environment
  reaches the workers as Ray's own processes inherit it, not as a ``runtime_env`` (Ray
  would start a fresh worker for an actor whose runtime environment differs from the
  prestarted ones'). Only as many workers warm up as Flower will make actors
  (``client_actors``), and only where the device a client will use is known before Ray
  assigns the worker (``warms_at_start``: the CPU, or a machine's only GPU); elsewhere the
  first round loads. When a client takes more than one CPU, Flower makes fewer actors than
  Ray starts workers, and Ray could give an actor a cold one: then the job's runtime
  environment carries the warm-up as a worker setup hook instead, and Flower's actors get
  workers of their own, which warm up as they start (seconds later than the prestarted ones
  would). A warm-up that fails leaves nothing half-done: the first round loads what it needs,
  as before, and reports any error itself.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

from fedft.config import FedftConfig, SimulationConfig

WARM_CONFIG_VAR = "FEDFT_WARM_CONFIG"  # the run's resolved config (wire JSON), for the workers' warm-up
WARM_CLAIMS_VAR = "FEDFT_WARM_CLAIMS"  # "N:DIR": the first N workers to create a file in DIR warm up
WARM_MODULE = "simulations.ray_warm"  # imported by every Ray worker as it starts
WARM_HOOK = "simulations.ray_cluster.warm_worker"  # or run by the workers Ray starts for the actors

log = logging.getLogger("fedft.simulation")


def ray_cpus(simulation: SimulationConfig, cores: int) -> int:
    """The CPUs Ray gets: enough for every simulated client to train at once, at most ``cores``
    (a client asking more than the machine has still finds no room, as with Ray's default)."""
    return min(cores, math.ceil(simulation.num_supernodes * simulation.num_cpus))


def client_actors(simulation: SimulationConfig, cpus: int) -> int:
    """The client actors Flower's engine builds on ``cpus`` CPUs (one per ``simulation.num_cpus``)."""
    return max(1, math.floor(cpus / simulation.num_cpus))


def warms_at_start(device: str, gpus_per_client: float) -> bool:
    """Whether a worker can load the base before Ray assigns it to a client, on the device the client
    will use: Ray shows an actor its GPUs only once it assigns them (and none to an actor that asks
    for none), after the worker started. So: clients on the CPU (``model.device`` 'cpu', or 'auto'
    on a machine without an NVIDIA GPU), or, on a machine with one GPU, clients that ask Ray for a
    share of it and run on it ('auto', 'cuda' or 'cuda:0'). With several GPUs the first round loads."""
    if device == "cpu":
        return True
    gpus = _nvidia_gpus()
    if device == "auto" and gpus == 0:
        return True
    return gpus == 1 and gpus_per_client > 0 and device in ("auto", "cuda", "cuda:0")


def _nvidia_gpus() -> int:
    """The GPUs the NVIDIA driver lists (Linux), counted without initialising CUDA in this process."""
    return sum(1 for _ in Path("/proc/driver/nvidia/gpus").glob("*"))


def start_ray(cfg: FedftConfig, claims_dir: Path, *, warm: bool = True) -> None:
    """Start Ray in this process for the simulation of ``cfg`` (before Flower's engine would).

    Unless ``warm`` is false, the first ``client_actors`` workers to start warm up (``warm_worker``;
    each claims its place with a file in ``claims_dir``, which must exist). A Ray already
    running in this process is left as it is (Flower's engine then uses it).
    """
    import ray

    if ray.is_initialized():
        return
    from fedft.federated import wire

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath  # as Flower's RayBackend does: workers import what the driver can
    cpus = ray_cpus(cfg.simulation, os.cpu_count() or 1)
    system_config: dict = {}
    runtime_env: dict | None = None
    if warm and warms_at_start(cfg.model.device, cfg.simulation.num_gpus):
        actors = client_actors(cfg.simulation, cpus)
        os.environ[WARM_CONFIG_VAR] = wire.encode_config(cfg)
        os.environ[WARM_CLAIMS_VAR] = f"{actors}:{claims_dir}"
        if actors >= cpus:  # every worker Ray starts for its CPUs becomes a client actor: warm them as they start
            system_config["preload_python_modules"] = [WARM_MODULE]
        else:  # fewer actors than those workers: Ray could give an actor a cold one; warm the actors' own workers
            runtime_env = {"worker_process_setup_hook": WARM_HOOK}
    # Ray's raylet inherits this environment and its workers inherit the raylet's
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, _system_config=system_config,
             runtime_env=runtime_env)


def warm_worker() -> None:
    """Load what this run's clients will need, while the server starts (``simulations.ray_warm``).

    Runs in every Ray worker process of the run as it starts, before it becomes a client
    actor; only regular workers warm up (not Ray's object-spilling I/O workers), and only the
    first ``client_actors`` of them (``claim_warm_up``). Never raises: a failed warm-up is
    logged at debug level and the client's first round does the work instead.
    """
    text = os.environ.get(WARM_CONFIG_VAR)
    if not text or not _is_task_worker() or not claim_warm_up(os.environ.get(WARM_CLAIMS_VAR, "")):
        return
    try:
        import clients.app  # noqa: F401 - quiets third-party loggers as a client would
        from fedft.data.partition import cached_partitions
        from fedft.federated import wire
        from fedft.model.load import cached_peft_model, model_spec

        cfg = wire.decode_config(text)
        cached_peft_model(model_spec(cfg))
        cached_partitions(cfg.data, cfg.simulation.num_supernodes)
    except Exception:  # noqa: BLE001 - the first round redoes this and reports its own error
        log.debug("worker warm-up failed; the first round loads instead", exc_info=True)


def claim_warm_up(claims: str) -> bool:
    """Whether this process is one of the first N to claim a warm-up (``claims`` is "N:DIR"): each
    claim is a file created in DIR, holding the claimant's pid, so extra workers (Ray starts one
    per CPU; a client may take several CPUs) load nothing they will not use."""
    count, _, directory = claims.partition(":")
    if not count.isdigit() or not directory:
        return False
    for place in range(int(count)):
        try:
            claim = os.open(Path(directory) / f"warm-{place}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            continue
        except OSError:
            return False
        with os.fdopen(claim, "w") as file:
            file.write(str(os.getpid()))  # which worker warmed up
        return True
    return False


def _is_task_worker() -> bool:
    """Whether this Ray process is a regular worker (one that can become an actor)."""
    try:
        import ray

        return ray._private.worker.global_worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - a Ray without this attribute: warm up anyway
        return True
