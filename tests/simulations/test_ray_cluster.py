"""The Ray cluster fedft starts for a simulation: its size and its workers' warm-up."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys

import pytest

from fedft.config import SimulationConfig, load_config
from fedft.federated import wire
from fedft.federated.client_round import client_rank, lora_for_rank
from fedft.model.load import LOAD_COUNTS, cached_peft_model, clear_model_cache, model_spec
from simulations import ray_cluster
from simulations.bench_runs import REPO_ROOT
from simulations.federation_process import TOKEN_VAR, kill_token_holders


def test_ray_gets_the_cpus_every_client_can_use_at_once_at_most_the_cores():
    assert ray_cluster.ray_cpus(SimulationConfig(num_supernodes=1, num_cpus=1), cores=16) == 1
    assert ray_cluster.ray_cpus(SimulationConfig(num_supernodes=3, num_cpus=0.5), cores=16) == 2
    assert ray_cluster.ray_cpus(SimulationConfig(num_supernodes=4, num_cpus=1), cores=2) == 2
    assert ray_cluster.ray_cpus(SimulationConfig(num_supernodes=1000, num_cpus=1), cores=8) == 8


def _client_spec(cfg):
    """The spec a simulated client's round loads (fedft.federated.client_round.run_client_round)."""
    rank = client_rank(cfg.lora, cfg.strategy, partition_id=0)
    return model_spec(dataclasses.replace(cfg, lora=lora_for_rank(cfg.lora, rank)))


def test_the_warm_up_loads_the_base_a_client_round_then_finds_loaded(tiny_config_path, monkeypatch, tmp_path):
    cfg = load_config(tiny_config_path)
    message_cfg = wire.decode_config(wire.encode_config(cfg))  # what a client's round sees
    monkeypatch.setenv(ray_cluster.WARM_CONFIG_VAR, wire.encode_config(cfg))
    monkeypatch.setenv(ray_cluster.WARM_CLAIMS_VAR, f"1:{tmp_path}")
    monkeypatch.setattr(ray_cluster, "_is_task_worker", lambda: True)
    clear_model_cache()
    spec = _client_spec(message_cfg)
    before = LOAD_COUNTS[spec]
    ray_cluster.warm_worker()
    assert LOAD_COUNTS[spec] == before + 1
    cached_peft_model(spec)  # the first round
    assert LOAD_COUNTS[spec] == before + 1
    clear_model_cache()


def test_a_failed_warm_up_raises_nothing_and_the_first_round_reports_the_error(tiny_config_path, monkeypatch,
                                                                             tmp_path):
    cfg = load_config(tiny_config_path)
    broken = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(tmp_path / "missing")))
    monkeypatch.setenv(ray_cluster.WARM_CONFIG_VAR, wire.encode_config(broken))
    monkeypatch.setenv(ray_cluster.WARM_CLAIMS_VAR, f"1:{tmp_path}")
    monkeypatch.setattr(ray_cluster, "_is_task_worker", lambda: True)
    clear_model_cache()
    ray_cluster.warm_worker()
    with pytest.raises(Exception, match="missing"):
        cached_peft_model(model_spec(broken))


def test_only_a_worker_of_a_simulation_with_a_claim_left_warms_up(tiny_config_path, monkeypatch, tmp_path):
    clear_model_cache()
    total = sum(LOAD_COUNTS.values())
    monkeypatch.delenv(ray_cluster.WARM_CONFIG_VAR, raising=False)
    monkeypatch.setenv(ray_cluster.WARM_CLAIMS_VAR, f"1:{tmp_path}")
    ray_cluster.warm_worker()  # no config: not a worker of a fedft simulation
    monkeypatch.setenv(ray_cluster.WARM_CONFIG_VAR, wire.encode_config(load_config(tiny_config_path)))
    ray_cluster.warm_worker()  # this test process is no Ray worker
    monkeypatch.setattr(ray_cluster, "_is_task_worker", lambda: True)
    (tmp_path / "warm-0").touch()  # the one warm-up this run has was claimed by another worker
    ray_cluster.warm_worker()
    assert sum(LOAD_COUNTS.values()) == total


def test_as_many_workers_warm_up_as_flower_makes_client_actors(tmp_path):
    assert ray_cluster.client_actors(SimulationConfig(num_supernodes=4, num_cpus=1), cpus=2) == 2
    assert ray_cluster.client_actors(SimulationConfig(num_supernodes=1, num_cpus=2), cpus=2) == 1
    assert ray_cluster.client_actors(SimulationConfig(num_supernodes=8, num_cpus=0.5), cpus=2) == 4
    claims = f"2:{tmp_path}"
    assert [ray_cluster.claim_warm_up(claims) for _ in range(3)] == [True, True, False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm-0", "warm-1"]
    assert not ray_cluster.claim_warm_up(f"1:{tmp_path / 'missing'}")  # no place to claim: no warm-up
    assert not ray_cluster.claim_warm_up("")


def test_workers_warm_up_only_where_the_client_s_device_is_known_before_ray_assigns_them(monkeypatch):
    monkeypatch.setattr(ray_cluster, "_nvidia_gpus", lambda: 0)
    assert ray_cluster.warms_at_start("cpu", 0) and ray_cluster.warms_at_start("auto", 0)
    monkeypatch.setattr(ray_cluster, "_nvidia_gpus", lambda: 1)
    assert ray_cluster.warms_at_start("cpu", 0)
    assert ray_cluster.warms_at_start("auto", 0.5) and ray_cluster.warms_at_start("cuda:0", 1)
    assert not ray_cluster.warms_at_start("auto", 0)  # Ray hides the GPU from an actor that asks for none
    assert not ray_cluster.warms_at_start("cuda:1", 1)
    monkeypatch.setattr(ray_cluster, "_nvidia_gpus", lambda: 2)
    assert not ray_cluster.warms_at_start("auto", 1)  # which GPU an actor gets is known only once Ray assigns it
    assert ray_cluster.warms_at_start("cpu", 0)


def test_ray_preloads_the_warm_up_when_every_worker_it_starts_becomes_an_actor(tiny_config_path, monkeypatch,
                                                                             tmp_path):
    import ray

    cfg = load_config(tiny_config_path)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_cluster, "warms_at_start", lambda device, gpus: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for variable in ("PYTHONPATH", ray_cluster.WARM_CONFIG_VAR, ray_cluster.WARM_CLAIMS_VAR):
        monkeypatch.setenv(variable, os.environ.get(variable, ""))  # restored afterwards
    for clients, cpus_each in ((4, 1), (1, 2)):
        simulation = dataclasses.replace(cfg.simulation, num_supernodes=clients, num_cpus=cpus_each)
        ray_cluster.start_ray(dataclasses.replace(cfg, simulation=simulation), tmp_path)
    one_cpu, two_cpus = calls
    assert one_cpu["num_cpus"] == 2 and one_cpu["runtime_env"] is None  # the prestarted workers are the actors
    assert one_cpu["_system_config"] == {"preload_python_modules": [ray_cluster.WARM_MODULE]}
    assert two_cpus["num_cpus"] == 2 and two_cpus["_system_config"] == {}  # one actor, two prestarted workers
    assert two_cpus["runtime_env"] == {"worker_process_setup_hook": ray_cluster.WARM_HOOK}
    assert os.environ[ray_cluster.WARM_CLAIMS_VAR] == f"1:{tmp_path}"


@pytest.mark.slow
def test_the_client_actor_is_the_worker_ray_started_first_and_it_is_already_warm(tiny_config_path, tmp_path):
    """Ray's own start, then an actor asked for as Flower's engine asks: it runs in the worker Ray
    prestarted during ``ray.init``, which loaded the base before the actor existed (one load)."""
    claims = tmp_path / "claims"
    claims.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(config=str(tiny_config_path), claims=str(claims)))
    token = f"test-{secrets.token_hex(4)}"
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, TOKEN_VAR: token, "PYTHONPATH": str(REPO_ROOT)})
    finally:
        kill_token_holders(token)
    assert done.returncode == 0, done.stderr[-3000:]
    warmed, actor_pid, loads, cached = json.loads(done.stdout.strip().splitlines()[-1])
    assert actor_pid == warmed  # the worker that claimed the warm-up before any actor was asked for
    assert loads == 1 and cached  # loaded once, before the actor ran, where a client round finds it
    assert sorted(p.name for p in claims.iterdir()) == ["warm-0"]


DRIVER = """
import dataclasses, json, os, time
from pathlib import Path

import ray

from fedft.config import load_config
from simulations.ray_cluster import start_ray

cfg = load_config({config!r})
cfg = dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, num_supernodes=1, num_cpus=1),
                          strategy=dataclasses.replace(cfg.strategy, min_train_nodes=1))
start_ray(cfg, Path({claims!r}))
claim = Path({claims!r}) / "warm-0"
for _ in range(600):  # the worker Ray starts during ray.init claims its warm-up; no actor exists yet
    if claim.is_file() and claim.read_text():
        break
    time.sleep(0.1)
warmed = int(claim.read_text()) if claim.is_file() else None


@ray.remote
class Client:
    def loads(self):
        from fedft.federated import wire
        from fedft.model.load import LOAD_COUNTS, model_spec
        from simulations.ray_cluster import WARM_CONFIG_VAR

        spec = model_spec(wire.decode_config(os.environ[WARM_CONFIG_VAR]))
        from fedft.model import load

        return os.getpid(), sum(LOAD_COUNTS.values()), spec in load._CACHE


actor_pid, loads, cached = ray.get(Client.options(num_cpus=1, num_gpus=0.0).remote().loads.remote())
print(json.dumps([warmed, actor_pid, loads, cached]))
"""

