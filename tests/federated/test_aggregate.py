"""FedAvg over adapter tensors against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from fedft.federated.aggregate import fedavg


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


# ------------------------------------------------------------------ robust aggregation

def _clients(*values):
    return [{"w": torch.tensor(v, dtype=torch.float32)} for v in values]


def test_trimmed_mean_and_median_by_hand():
    from fedft.federated.aggregate import coordinate_median, trimmed_mean

    states = _clients([1.0, -4.0], [2.0, 0.0], [3.0, 1.0], [100.0, 2.0])
    # k = floor(0.25 * 4) = 1 cut at each end of every coordinate: (2 + 3) / 2 and (0 + 1) / 2
    assert torch.equal(trimmed_mean(states, 0.25)["w"], torch.tensor([2.5, 0.5]))
    assert torch.equal(coordinate_median(states)["w"], torch.tensor([2.5, 0.5]))
    five = _clients([1.0], [2.0], [3.0], [4.0], [1000.0])
    assert coordinate_median(five)["w"].item() == 3.0 and trimmed_mean(five, 0.2)["w"].item() == 3.0
    # nothing cut: the unweighted mean
    assert torch.allclose(trimmed_mean(states, 0.0)["w"], fedavg(states, [1, 1, 1, 1])["w"])


def test_one_attacker_cannot_drag_robust_aggregates_out_of_the_honest_range():
    from fedft.federated.aggregate import coordinate_median, trimmed_mean

    generator = torch.Generator().manual_seed(0)
    honest = [{"w": torch.randn(50, generator=generator) * 0.1 + 1.0} for _ in range(4)]
    attacker = {"w": torch.full((50,), -1e6)}
    low = torch.stack([h["w"] for h in honest]).min(dim=0).values
    high = torch.stack([h["w"] for h in honest]).max(dim=0).values
    states = honest + [attacker]
    for result in (trimmed_mean(states, 0.2), coordinate_median(states)):
        assert bool(((result["w"] >= low) & (result["w"] <= high)).all())
    assert fedavg(states, [1] * 5)["w"].max() < -1e5  # the mean is dragged along


def test_robust_aggregation_refuses_bad_input():
    from fedft.federated.aggregate import coordinate_median, trimmed_mean

    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        trimmed_mean(_clients([1.0], [2.0]), 0.5)
    with pytest.raises(ValueError, match="shape"):
        coordinate_median(_clients([1.0], [1.0, 2.0]))
    with pytest.raises(ValueError, match="no client updates"):
        coordinate_median([])
