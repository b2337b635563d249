"""Exact LoRA aggregation against dense reference computations."""

from __future__ import annotations

import pytest
import torch

from fedft.federated.aggregate import fedavg
from fedft.federated.lora_aggregate import (
    adapter_rank,
    b_only,
    ffa_aggregate,
    lora_pairs,
    naive_aggregation_error,
    pad_to_rank,
    svd_aggregate,
    truncate_to_rank,
)

LAYERS = {"m.layers.0.q_proj": (12, 10), "m.layers.0.down_proj": (8, 14)}  # (out, in)


def adapter(rank: int, seed: int, shared_a: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, inp) in LAYERS.items():
        state[f"{name}.lora_A.weight"] = (shared_a or {}).get(
            f"{name}.lora_A.weight", torch.randn(rank, inp, generator=g))
        state[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return state


def dense(states, weights, layer):
    total = sum(weights)
    a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
    return sum((w / total) * s[b].double() @ s[a].double() for w, s in zip(weights, states))


def product(state, layer):
    return state[f"{layer}.lora_B.weight"].double() @ state[f"{layer}.lora_A.weight"].double()


def test_svd_equals_the_dense_weighted_sum_of_products_when_the_rank_allows():
    states = [adapter(2, 1), adapter(2, 2), adapter(2, 3)]
    weights = [1.0, 2.0, 5.0]
    result = svd_aggregate(states, weights, rank=6)  # 3 clients x rank 2 fit in rank 6
    for layer in LAYERS:
        torch.testing.assert_close(product(result.state, layer), dense(states, weights, layer),
                                   rtol=0, atol=1e-5)
    assert result.discarded_energy < 1e-12
    assert adapter_rank(result.state) == 6


def test_svd_is_the_best_rank_r_approximation_otherwise():
    states = [adapter(4, 1), adapter(4, 2), adapter(4, 3)]
    weights = [3.0, 1.0, 1.0]
    rank = 4
    result = svd_aggregate(states, weights, rank=rank)
    dropped = total = 0.0
    for layer in LAYERS:
        exact = dense(states, weights, layer)
        u, s, vh = torch.linalg.svd(exact)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young
        torch.testing.assert_close(product(result.state, layer), best, rtol=0, atol=1e-5)
        dropped += float((s[rank:] ** 2).sum())
        total += float((s ** 2).sum())
    assert result.discarded_energy == pytest.approx(dropped / total, rel=1e-9)
    assert 0.0 < result.discarded_energy < 1.0


def test_svd_can_keep_a_at_a_given_row_norm_with_the_same_product():
    states = [adapter(2, 1), adapter(2, 2)]
    norms = {f"{layer}.lora_A.weight": 0.7 for layer in LAYERS}
    result = svd_aggregate(states, [1.0, 1.0], rank=6, a_row_norms=norms)  # exact sum has rank 4
    for layer in LAYERS:
        a = result.state[f"{layer}.lora_A.weight"]
        torch.testing.assert_close(a.norm(dim=1), torch.full((6,), 0.7), rtol=0, atol=1e-5)
        torch.testing.assert_close(a @ a.T, 0.49 * torch.eye(6), rtol=0, atol=1e-5)  # padding orthogonal
        torch.testing.assert_close(product(result.state, layer), dense(states, [1.0, 1.0], layer),
                                   rtol=0, atol=1e-5)


def test_svd_factors_are_in_decreasing_singular_value_order_so_truncation_is_best():
    states = [adapter(4, 1), adapter(4, 2)]
    result = svd_aggregate(states, [1.0, 1.0], rank=8)
    small = truncate_to_rank(result.state, 3)
    for layer in LAYERS:
        u, s, vh = torch.linalg.svd(dense(states, [1.0, 1.0], layer))
        torch.testing.assert_close(product(small, layer), (u[:, :3] * s[:3]) @ vh[:3], rtol=0, atol=1e-5)


def test_ffa_aggregation_is_exact_with_a_shared_frozen_a():
    shared = adapter(4, 0)
    states = [adapter(4, seed, shared_a=shared) for seed in (1, 2, 3)]
    weights = [1.0, 1.0, 2.0]
    merged = ffa_aggregate(states, weights, frozen_a=shared)
    for layer in LAYERS:
        torch.testing.assert_close(product(merged, layer), dense(states, weights, layer), rtol=0, atol=1e-5)
    assert naive_aggregation_error(states, weights) < 1e-7
    assert set(b_only(merged)) == {k for k in merged if ".lora_B." in k}


def test_naive_error_matches_the_dense_definition():
    states = [adapter(3, 1), adapter(3, 2)]
    weights = [1.0, 3.0]
    naive = fedavg(states, weights)
    num = den = 0.0
    for layer in LAYERS:
        exact = dense(states, weights, layer)
        num += float(((exact - product(naive, layer)) ** 2).sum())
        den += float((exact ** 2).sum())
    # fedavg rounds to float32
    assert naive_aggregation_error(states, weights) == pytest.approx((num / den) ** 0.5, rel=1e-6)
    assert naive_aggregation_error(states, weights) > 0.1


def test_one_client_has_no_naive_averaging_error():
    assert naive_aggregation_error([adapter(3, 1)], [3.0]) == 0.0  # exactly: mean(B A) is mean(B) mean(A)


def test_heterogeneous_ranks_pad_and_truncate_with_the_right_shapes_and_values():
    small, large = adapter(2, 1), adapter(6, 2)
    padded = pad_to_rank(small, 6)
    assert adapter_rank(padded) == 6
    for layer, (out, inp) in LAYERS.items():
        assert padded[f"{layer}.lora_A.weight"].shape == (6, inp)
        assert padded[f"{layer}.lora_B.weight"].shape == (out, 6)
        torch.testing.assert_close(product(padded, layer), product(small, layer))  # same update
        assert torch.all(padded[f"{layer}.lora_A.weight"][2:] == 0)
    # HetLoRA: the zero-padded naive average
    naive = fedavg([padded, large], [1.0, 1.0])
    a = "m.layers.0.q_proj.lora_A.weight"
    torch.testing.assert_close(naive[a][:2], (small[a] + large[a][:2]) / 2)
    torch.testing.assert_close(naive[a][2:], large[a][2:] / 2)
    # exact: svd over mixed ranks equals the dense sum, then each client gets its own rank
    exact = svd_aggregate([small, large], [1.0, 1.0], rank=8)
    for layer in LAYERS:
        torch.testing.assert_close(product(exact.state, layer), dense([small, large], [1.0, 1.0], layer),
                                   rtol=0, atol=1e-5)
    for rank in (2, 6):
        share = truncate_to_rank(exact.state, rank)
        assert adapter_rank(share) == rank
    with pytest.raises(ValueError, match="below the requested"):
        truncate_to_rank(small, 4)
    with pytest.raises(ValueError, match="above the target rank"):
        pad_to_rank(large, 2)


def test_unpaired_lora_tensors_are_refused():
    state = adapter(2, 1)
    del state["m.layers.0.q_proj.lora_B.weight"]
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs(state)
