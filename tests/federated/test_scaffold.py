"""SCAFFOLD: the control-variate updates by hand, and SCAFFOLD with zero variates is FedAvg."""

from __future__ import annotations

import json

import pytest
import torch

from fedft.federated.scaffold import ControlVariates, client_variate, correction, lr_sum, server_variate


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_the_control_variates_update_as_computed_by_hand():
    c, c_i = {"w": t(1.0, 2.0)}, {"w": t(0.5, -1.0)}
    x, y = {"w": t(1.0, 1.0)}, {"w": t(0.8, 1.2)}
    # c_i+ = c_i - c + (x - y) / lr_sum = [0.5 - 1 + 0.2/0.1, -1 - 2 - 0.2/0.1] = [1.5, -5]
    new = client_variate(c, c_i, x, y, lr_sum=0.1)
    assert torch.allclose(new["w"], t(1.5, -5.0), atol=1e-6)
    # c+ = c + (c_i+ - c_i) / N with N = 4: [1 + 1/4, 2 - 4/4] = [1.25, 1.0]
    assert torch.allclose(server_variate(c, [c_i], [new], num_clients=4)["w"], t(1.25, 1.0), atol=1e-6)
    assert torch.allclose(correction(c, c_i)["w"], t(0.5, 3.0), atol=1e-6)
    assert lr_sum(0.01, [1.0, 0.5, 0.25]) == pytest.approx(0.0175)


def test_a_client_the_server_has_not_seen_starts_at_zero_and_every_round_is_folded_in():
    variates = ControlVariates({"w": t(0.0, 0.0)})
    assert torch.equal(variates.correction_for(7)["w"], t(0.0, 0.0))
    x = {"w": t(1.0, 1.0)}
    variates.update(x, {7: ({"w": t(0.9, 1.1)}, 0.1), 8: ({"w": t(1.0, 0.8)}, 0.2)}, num_clients=2)
    # c_7 = (x - y_7) / 0.1 = [1, -1]; c_8 = (x - y_8) / 0.2 = [0, 1]; c = (c_7 + c_8) / 2 = [0.5, 0]
    assert torch.allclose(variates.clients[7]["w"], t(1.0, -1.0), atol=1e-6)
    assert torch.allclose(variates.clients[8]["w"], t(0.0, 1.0), atol=1e-6)
    assert torch.allclose(variates.c["w"], t(0.5, 0.0), atol=1e-6)
    assert torch.allclose(variates.correction_for(7)["w"], t(-0.5, 1.0), atol=1e-6)
    restored = ControlVariates({"w": t(0.0, 0.0)})
    restored.restore(variates.to_tensors())
    assert restored.c.keys() == variates.c.keys() and set(restored.clients) == {7, 8}
    assert torch.equal(restored.clients[8]["w"], variates.clients[8]["w"])
    with pytest.raises(ValueError, match="lr_sum"):
        client_variate(variates.c, None, x, x, 0.0)


def test_a_zero_correction_trains_exactly_as_without_one(tiny_config_path):
    from fedft.config import load_config
    from fedft.federated.client_round import client_examples
    from fedft.model.load import cached_peft_model, initial_adapter_state, model_spec
    from fedft.train.local import train_local

    cfg = load_config(tiny_config_path, ["train.local_steps=3"])
    model, tokenizer = cached_peft_model(model_spec(cfg))
    examples = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes, partition_id=0)
    start = initial_adapter_state(model_spec(cfg))
    args = dict(global_state=start, round_index=1, total_rounds=2, seed=5)
    plain = train_local(model, examples, tokenizer.pad_token_id, cfg.train, **args)
    zero = train_local(model, examples, tokenizer.pad_token_id, cfg.train,
                       correction={k: torch.zeros_like(v) for k, v in start.items()}, **args)
    assert all(torch.equal(plain.state[k], zero.state[k]) for k in plain.state)
    assert plain.lr_sum is None and zero.lr_sum == pytest.approx(3 * cfg.train.learning_rate)
    pushed = train_local(model, examples, tokenizer.pad_token_id, cfg.train,
                         correction={k: torch.ones_like(v) for k, v in start.items()}, **args)
    # with a constant lr the correction moves every tensor by -lr_sum * 1 on top of training (AdamW then sees
    # slightly different weights, so on average, not exactly)
    shift = torch.cat([(pushed.state[k] - plain.state[k]).flatten() for k in start]).mean()
    assert float(shift) == pytest.approx(-zero.lr_sum, rel=0.2)


@pytest.fixture
def deploy(tiny_model_dir, tmp_path, task_identity):
    from tests.clients.inprocess import data_only, run_job, two_institutions

    config, sites = two_institutions(tmp_path, tiny_model_dir)
    return lambda name, overrides: run_job(config, data_only(sites), tmp_path / name, overrides)


def test_scaffold_with_zero_variates_and_one_local_step_is_fedavg_and_then_departs(deploy):
    from safetensors.torch import load_file

    common = "train.local_steps=1 strategy.num_rounds=1 report.evaluate_stages=false"
    fedavg = deploy("fedavg", common)
    scaffold = deploy("scaffold", common + " strategy.name=scaffold")
    a = load_file(fedavg / "adapter" / "adapter_model.safetensors")
    b = load_file(scaffold / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (scaffold / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (fedavg / "metrics.jsonl").read_text().splitlines()]
    # the correction doubles the adapter bytes down (each client's reply is an adapter of the same size);
    # the two messages' config JSON also says "scaffold" for "fedavg" (2 bytes longer each)
    extra_config = 2 * (len("scaffold") - len("fedavg"))
    assert rows[1]["bytes_down"] - plain[1]["bytes_down"] - extra_config == plain[1]["bytes_up"] == rows[1]["bytes_up"]
    two = deploy("scaffold-2", "train.local_steps=2 strategy.num_rounds=2 strategy.name=scaffold")
    avg2 = deploy("fedavg-2", "train.local_steps=2 strategy.num_rounds=2")
    c = load_file(two / "adapter" / "adapter_model.safetensors")
    d = load_file(avg2 / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(c[k], d[k]) for k in c)  # round 2 carries nonzero corrections



def test_the_result_does_not_depend_on_the_order_replies_arrive_in(tiny_model_dir, tmp_path, task_identity):
    """Float sums depend on the order of their terms; the server combines replies in content order, so
    SCAFFOLD's adapter and control variates come out bit-identical when the replies arrive reversed."""
    from safetensors.torch import load_file

    from tests.clients.inprocess import InProcessGrid, data_only, run_job, two_institutions

    class ReversedGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return list(reversed(super().send_and_receive(messages, timeout=timeout)))

    config, sites = two_institutions(tmp_path, tiny_model_dir)
    overrides = "strategy.name=scaffold strategy.num_rounds=3 strategy.eval_every=0 report.evaluate_stages=false"
    runs = [run_job(config, data_only(sites), tmp_path / name, overrides, grid_class=grid)
            for name, grid in (("in-order", InProcessGrid), ("reversed", ReversedGrid))]
    variates = ("checkpoints", "round-003", "server_optimizer.safetensors")  # SCAFFOLD's c and c_i
    for files in (("adapter", "adapter_model.safetensors"), variates):
        a, b = (load_file(run.joinpath(*files)) for run in runs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), files
