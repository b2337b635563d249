"""Server strategies over the real ServerApp and ClientApps, delivered in this process.

FedProx at mu = 0 must be FedAvg; FFA with FedAdam must send only B and keep A frozen. These are
properties of fedft's strategy and client code, so they run over the in-process Grid
(tests/clients/inprocess.py) in seconds; Flower's Simulation Engine itself is exercised by
tests/simulations/test_simulation.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedft.rundir import load_metrics
from tests.clients.inprocess import data_only, run_job, two_institutions


@pytest.fixture
def deploy(tiny_model_dir, tmp_path, task_identity):
    config, sites = two_institutions(tmp_path, tiny_model_dir)
    return lambda name, overrides="": run_job(config, data_only(sites), tmp_path / name, overrides)


def _adapter(run_dir, where="adapter"):
    return load_file(run_dir / where / "adapter_model.safetensors")


def test_fedprox_with_mu_zero_reproduces_fedavg(deploy):
    fedavg = _adapter(deploy("fedavg"))
    prox = _adapter(deploy("prox", "strategy.name=fedprox strategy.proximal_mu=0.0"))
    assert fedavg.keys() == prox.keys()
    for key in fedavg:
        torch.testing.assert_close(fedavg[key], prox[key], rtol=0, atol=1e-6)
    pulled = _adapter(deploy("prox-1", "strategy.name=fedprox strategy.proximal_mu=1.0"))
    assert any(not torch.equal(fedavg[k], pulled[k]) for k in fedavg)  # the proximal term is applied


def test_ffa_with_fedadam_sends_only_b_and_keeps_a_frozen(deploy):
    plain = load_metrics(deploy("fedavg"))
    run = deploy("ffa", "strategy.aggregation=ffa strategy.server_optimizer=fedadam strategy.server_lr=0.01")
    rows = load_metrics(run)
    assert rows[1]["bytes_up_per_client"] < 0.6 * plain[1]["bytes_up_per_client"]
    assert rows[1]["aggregation_error"] < 1e-6  # a shared A makes the plain average exact
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]
    first, final = _adapter(run, "checkpoints/round-001"), _adapter(run)
    for key in final:
        if ".lora_A." in key:
            assert torch.equal(final[key], first[key])
    assert any(not torch.equal(final[k], first[k]) for k in final if ".lora_B." in k)
    moments = load_file(run / "checkpoints" / "round-002" / "server_optimizer.safetensors")
    assert any(k.startswith("m_t/") for k in moments) and any(k.startswith("v_t/") for k in moments)
