"""Integration: real Flower Simulation Engine (Ray) runs with a tiny NF4 model on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedft.config import load_config
from fedft.report import load_metrics

pytestmark = pytest.mark.slow


def _run(config_path, out, overrides=()):
    from simulations.runner import simulate

    return simulate(load_config(config_path, list(overrides)), out)


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory, tiny_model_dir):
    # module-scoped copy of the tiny config so the Ray run happens once for several tests
    from fedft.demo import make_demo_rows, make_eval_rows, write_jsonl
    from tests.conftest import TINY_TOML

    d = tmp_path_factory.mktemp("sim")
    write_jsonl(make_demo_rows(2, 24, 0.9, seed=0), d / "train.jsonl")
    write_jsonl(make_eval_rows(2, seed=1), d / "eval.jsonl")
    (d / "tiny.toml").write_text(TINY_TOML.format(model=tiny_model_dir))
    summary = _run(d / "tiny.toml", d / "run")
    return d, summary


def test_two_clients_two_rounds_loss_falls_and_adapter_changes(fedavg_run):
    d, summary = fedavg_run
    run = d / "run"
    rows = load_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["train_loss"] < rows[1]["train_loss"]
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]
    for key in ("eval_exact_match", "eval_exact_match_by_task", "bytes_up", "bytes_down", "seconds"):
        assert key in rows[2], key
    assert rows[1]["clients"] == 2
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    first = load_file(run / "checkpoints" / "round-001" / "adapter_model.safetensors")
    assert final.keys() == first.keys()
    assert any(not torch.equal(final[k], first[k]) for k in final)
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2
    assert (run / "curves.png").stat().st_size > 0


def test_bytes_are_logged_per_round_and_cover_the_adapter(fedavg_run):
    d, _ = fedavg_run
    for row in load_metrics(d / "run")[1:]:
        # each client received and sent the whole adapter plus per-tensor framing
        assert row["bytes_up_per_client"] >= row["adapter_bytes"]
        assert row["bytes_down"] / row["clients"] >= row["adapter_bytes"]
        assert row["bytes_up"] == row["clients"] * row["bytes_up_per_client"]


def test_fedprox_with_mu_zero_reproduces_fedavg(fedavg_run):
    d, _ = fedavg_run
    _run(d / "tiny.toml", d / "prox", ["strategy.name=fedprox", "strategy.proximal_mu=0.0"])
    a = load_file(d / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(d / "prox" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
