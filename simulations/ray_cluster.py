"""The Ray cluster under ``fedft simulate``: started by fedft, sized to the run, its workers warmed.

Flower's Simulation Engine starts Ray itself unless Ray is already running in the process;
fedft starts it first, with the same settings Flower would use (no dashboard, the driver's
``sys.path`` as every worker's ``PYTHONPATH``) and two more:

- **CPUs**: Ray gets the CPUs the run's clients can use at once (``ray_cpus``): every
  simulated client at ``simulation.num_cpus`` each, at most the machine's cores. Flower
  builds one actor per ``simulation.num_cpus`` CPUs Ray has, so a run with fewer simulated
  clients than cores no longer starts actors that never train (each one a Python process
  importing Flower, and with the warm-up below, torch and the base).
- **Warm-up** (``worker_process_setup_hook``): a Ray worker process, as it starts, imports
  the client's libraries (torch, transformers, peft, bitsandbytes) and loads the run's
  4-bit base and its data split into this process's caches (``warm_worker``), the same
  ones a client's first round uses. Flower starts its actors with its engine, which fedft
  starts before the run's checks have finished (simulations/federation_process.py): the
  actors load while the server loads its own base and evaluates round 0, instead of after
  round 1's message arrived. A warm-up that fails leaves nothing half-done: the first round
  loads what it needs, as before, and reports any error itself.
"""

from __future__ import annotations

import logging
import math
import os
import sys

from fedft.config import FedftConfig, SimulationConfig

WARM_CONFIG_VAR = "FEDFT_WARM_CONFIG"  # the run's resolved config (wire JSON), for the workers' warm-up
WARM_HOOK = "simulations.ray_cluster.warm_worker"

log = logging.getLogger("fedft.simulation")


def ray_cpus(simulation: SimulationConfig, cores: int) -> int:
    """The CPUs Ray gets: enough for every simulated client to train at once, at most ``cores``
    (a client asking more than the machine has still finds no room, as with Ray's default)."""
    return min(cores, math.ceil(simulation.num_supernodes * simulation.num_cpus))


def start_ray(cfg: FedftConfig, *, warm: bool = True) -> None:
    """Start Ray in this process for the simulation of ``cfg`` (before Flower's engine would).

    The workers run ``warm_worker`` with the run's config unless ``warm`` is false. A Ray
    already running in this process is left as it is (Flower's engine then uses it).
    """
    import ray

    if ray.is_initialized():
        return
    from fedft.federated import wire

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath  # as Flower's RayBackend does: workers import what the driver can
    env_vars = {"PYTHONPATH": pythonpath}
    runtime_env: dict = {"env_vars": env_vars}
    if warm:
        env_vars[WARM_CONFIG_VAR] = wire.encode_config(cfg)
        runtime_env["worker_process_setup_hook"] = WARM_HOOK
    cpus = ray_cpus(cfg.simulation, os.cpu_count() or 1)
    ray.init(runtime_env=runtime_env, num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR)


def warm_worker() -> None:
    """Ray's worker setup hook: load what this run's clients will need, while the server starts.

    Runs in every Ray worker process of the run, before it becomes a client actor; only
    regular workers warm up (not Ray's object-spilling I/O workers). Never raises: a failed
    warm-up is logged at debug level and the client's first round does the work instead.
    """
    text = os.environ.get(WARM_CONFIG_VAR)
    if not text or not _is_task_worker():
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


def _is_task_worker() -> bool:
    """Whether this Ray process is a regular worker (one that can become an actor)."""
    try:
        import ray

        return ray._private.worker.global_worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - a Ray without this attribute: warm up anyway
        return True
