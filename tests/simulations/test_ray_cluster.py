"""The Ray cluster fedft starts for a simulation: its size and its workers' warm-up."""

from __future__ import annotations

import dataclasses

import pytest

from fedft.config import SimulationConfig, load_config
from fedft.federated import wire
from fedft.federated.client_round import client_rank, lora_for_rank
from fedft.model.load import LOAD_COUNTS, cached_peft_model, clear_model_cache, model_spec
from simulations import ray_cluster


def test_ray_gets_the_cpus_every_client_can_use_at_once_at_most_the_cores():
    assert ray_cluster.ray_cpus(SimulationConfig(num_supernodes=1, num_cpus=1), cores=16) == 1
    assert ray_cluster.ray_cpus(SimulationConfig(num_supernodes=3, num_cpus=0.5), cores=16) == 2
    assert ray_cluster.ray_cpus(SimulationConfig(num_supernodes=4, num_cpus=1), cores=2) == 2
    assert ray_cluster.ray_cpus(SimulationConfig(num_supernodes=1000, num_cpus=1), cores=8) == 8


def _client_spec(cfg):
    """The spec a simulated client's round loads (fedft.federated.client_round.run_client_round)."""
    rank = client_rank(cfg.lora, cfg.strategy, partition_id=0)
    return model_spec(dataclasses.replace(cfg, lora=lora_for_rank(cfg.lora, rank)))


def test_the_warm_up_loads_the_base_a_client_round_then_finds_loaded(tiny_config_path, monkeypatch):
    cfg = load_config(tiny_config_path)
    message_cfg = wire.decode_config(wire.encode_config(cfg))  # what a client's round sees
    monkeypatch.setenv(ray_cluster.WARM_CONFIG_VAR, wire.encode_config(cfg))
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
    monkeypatch.setattr(ray_cluster, "_is_task_worker", lambda: True)
    clear_model_cache()
    ray_cluster.warm_worker()
    with pytest.raises(Exception, match="missing"):
        cached_peft_model(model_spec(broken))


def test_only_a_worker_of_a_simulation_warms_up(tiny_config_path, monkeypatch):
    clear_model_cache()
    total = sum(LOAD_COUNTS.values())
    monkeypatch.delenv(ray_cluster.WARM_CONFIG_VAR, raising=False)
    ray_cluster.warm_worker()  # no config: not a worker of a fedft simulation
    monkeypatch.setenv(ray_cluster.WARM_CONFIG_VAR, wire.encode_config(load_config(tiny_config_path)))
    ray_cluster.warm_worker()  # this test process is no Ray worker
    assert sum(LOAD_COUNTS.values()) == total
