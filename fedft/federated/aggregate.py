"""Aggregation of adapter tensors: pure functions, tensors in, tensors out.

``fedavg`` is the example-weighted average of each tensor (McMahan et al. 2017). Applied
to LoRA it averages A and B separately, which is what every federated LLM framework ships;
it is kept as the baseline for exact aggregators. ``trimmed_mean`` and ``coordinate_median``
are the Byzantine-robust alternatives of Yin et al. 2018 (arXiv:1803.01498): per coordinate,
drop the ``k`` largest and smallest client values and average the rest, or take the median,
so up to ``k`` (or just under half) arbitrary replies cannot drag the result past the honest
ones' range. They ignore example counts, as the robustness argument needs. No I/O, no
randomness, no flwr.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to one; all must be >= 0 and at least one > 0."""
    if not weights:
        raise ValueError("no client updates to aggregate")
    if any(w < 0 for w in weights):
        raise ValueError(f"aggregation weights must be >= 0, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}; at least one must be > 0")
    return [w / total for w in weights]


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of each tensor over clients (float64 accumulation, float32 result)."""
    shares = normalized_weights(weights)
    if len(shares) != len(states):
        raise ValueError(f"{len(states)} client states but {len(shares)} weights")
    out = {}
    for key in same_tensors(states):
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for share, state in zip(shares, states):
            acc += share * state[key].to(torch.float64)
        out[key] = acc.to(torch.float32)
    return out


def same_tensors(states: Sequence[dict[str, torch.Tensor]]) -> list[str]:
    """The tensor names every client sent, after checking all sent the same names and shapes."""
    if not states:
        raise ValueError("no client updates to aggregate")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"client {i} sent tensors {sorted(set(state) ^ set(keys))[:3]} that differ from client 0")
        for key in keys:
            if state[key].shape != states[0][key].shape:
                raise ValueError(f"tensor {key}: shape {tuple(state[key].shape)} differs from "
                                 f"{tuple(states[0][key].shape)}")
    return keys


def trimmed_count(num_clients: int, trim_fraction: float) -> int:
    """k = floor(trim_fraction * n) values cut from each end; at least one value must remain."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return int(trim_fraction * num_clients)


def _mean_between(states: Sequence[dict[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
    """Per coordinate: the mean of the client values left after cutting the k lowest and k highest."""
    out = {}
    for key in same_tensors(states):
        stacked, _ = torch.sort(torch.stack([s[key].to(torch.float64) for s in states]), dim=0)
        out[key] = stacked[k:len(states) - k].mean(dim=0).to(torch.float32)
    return out


def trimmed_mean(states: Sequence[dict[str, torch.Tensor]], trim_fraction: float) -> dict[str, torch.Tensor]:
    """Per coordinate: the mean of the client values left after cutting the k lowest and k highest."""
    return _mean_between(states, trimmed_count(len(states), trim_fraction))


def coordinate_median(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per coordinate: the median of the client values (the mean of the middle two for an even count)."""
    return _mean_between(states, (len(states) - 1) // 2)
