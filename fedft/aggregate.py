"""Aggregation of adapter tensors: pure functions, tensors in, tensors out.

``fedavg`` is the example-weighted average of each tensor (McMahan et al. 2017). Applied
to LoRA it averages A and B separately, which is what every federated LLM framework ships;
it is kept as the baseline for exact aggregators. No I/O, no randomness, no flwr.
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
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"client {i} sent tensors {sorted(set(state) ^ set(keys))[:3]} that differ from client 0")
    out = {}
    for key in keys:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for share, state in zip(shares, states):
            if state[key].shape != acc.shape:
                raise ValueError(f"tensor {key}: shape {tuple(state[key].shape)} differs from {tuple(acc.shape)}")
            acc += share * state[key].to(torch.float64)
        out[key] = acc.to(torch.float32)
    return out
