"""FedAvg over adapter tensors against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from fedft.aggregate import fedavg


def test_fedavg_weights_by_examples_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = fedavg([a, b], [10, 30])
    # 0.25 * a + 0.75 * b
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[3.0]]))
    assert out["w"].dtype == torch.float32


def test_fedavg_of_identical_states_is_that_state():
    s = {"w": torch.randn(4, 3)}
    assert torch.allclose(fedavg([s, s, s], [1, 5, 2])["w"], s["w"], atol=1e-7)


@pytest.mark.parametrize("states, weights, fragment", [
    ([], [], "no client updates"),
    ([{"w": torch.zeros(2)}], [0], "sum to 0.0"),
    ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1, 1], "shape"),
    ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [1, 1], "differ from client 0"),
    ([{"w": torch.zeros(2)}], [-1], ">= 0"),
])
def test_fedavg_refuses_inconsistent_input(states, weights, fragment):
    with pytest.raises(ValueError, match=fragment):
        fedavg(states, weights)
