"""What the server sends each client and how it turns the replies into the next adapter.

Pure functions over adapter states, shared by the Flower strategies and the tests:
``downlink_state`` (the global adapter cut to a client's rank, B only under FFA-LoRA, in the
wire dtype), ``reply_to_full_state`` (a reply back to a float32 adapter the aggregators
understand), ``content_order`` (the order replies are combined in, whatever order they
arrived in) and ``aggregate_replies`` (fedavg / ffa / svd, or a robust trimmed mean / median,
plus the per-round diagnostics: the naive average's error against the exact mean of products
and the SVD's discarded energy). No flwr, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedft.config import PrivacyConfig, StrategyConfig
from fedft.federated.aggregate import coordinate_median, fedavg, trimmed_mean
from fedft.federated.lora_aggregate import (
    LORA_A,
    adapter_rank,
    b_only,
    ffa_aggregate,
    naive_aggregation_error,
    pad_to_rank,
    svd_aggregate,
    truncate_to_rank,
)


def wire_dtype(strategy: StrategyConfig) -> torch.dtype:
    """The dtype adapter tensors travel in (Flower records carry no bfloat16)."""
    return torch.float16 if strategy.wire_dtype == "float16" else torch.float32


def downlink_state(
    strategy: StrategyConfig, global_state: dict[str, torch.Tensor], rank: int | None = None
) -> dict[str, torch.Tensor]:
    """The part of the global adapter one client needs, as it travels."""
    state = global_state
    if rank is not None and rank < adapter_rank(state):
        state = truncate_to_rank(state, rank)
    if strategy.aggregation == "ffa":
        state = b_only(state)
    return {k: v.to(wire_dtype(strategy)) for k, v in state.items()}


def reply_to_full_state(
    strategy: StrategyConfig, global_state: dict[str, torch.Tensor], reply: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A client's reply as a float32 adapter with A and B (A from the global one under FFA)."""
    state = {k: v.to(torch.float32) for k, v in reply.items()}
    if strategy.aggregation == "ffa":
        state = {**{k: v for k, v in global_state.items() if f".{LORA_A}." in k}, **state}
    return dict(sorted(state.items()))


@dataclass(frozen=True)
class AggregateResult:
    """The next global adapter and what the round's aggregation cost in accuracy."""

    state: dict[str, torch.Tensor]
    naive_error: float | None  # ||mean(BA) - mean(B)mean(A)||_F / ||mean(BA)||_F (None: no replies)
    discarded_energy: float | None  # svd only: share of sigma^2 cut by the rank limit


def state_digest(state: dict[str, torch.Tensor]) -> bytes:
    """SHA-256 over a state's tensor names, dtypes, shapes and bytes.

    ``fedft.federated.audit_trail.tensors_sha256`` hashes the same fields ("\\n" after the shape
    where this has "|"); both stay as they are: that one is recorded in institutions' trails,
    this one fixes the order replies are combined in, which every measured run depends on.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def content_order(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> list[int]:
    """Indices of the replies sorted by their content (digest, then weight).

    Replies arrive in whatever order the clients finish, and float sums depend on the order of
    their terms; combined in this order, the same replies give the same bits however they arrived.
    """
    keys = [(state_digest(s), w) for s, w in zip(states, weights, strict=True)]
    return sorted(range(len(states)), key=lambda i: keys[i])


def aggregate_replies(
    strategy: StrategyConfig,
    global_state: dict[str, torch.Tensor],
    replies: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    rank: int,
) -> AggregateResult:
    """Combine the replies with ``strategy.aggregation`` into an adapter of rank ``rank`` (``lora.r``)."""
    full = [reply_to_full_state(strategy, global_state, r) for r in replies]
    padded = [pad_to_rank(s, rank) for s in full]
    error = naive_aggregation_error(padded, weights)
    name = strategy.aggregation
    if name == "svd":
        a_norms = {k: float(v.norm(dim=1).mean()) for k, v in global_state.items() if f".{LORA_A}." in k}
        result = svd_aggregate(full, weights, rank=rank, a_row_norms=a_norms)
        return AggregateResult(result.state, error, result.discarded_energy)
    robust = strategy.robust
    if robust != "none":  # FFA's A is the same frozen tensor on every client, so robust statistics keep it
        state = (coordinate_median(padded) if robust == "median"
                 else trimmed_mean(padded, strategy.trim_fraction))
        return AggregateResult(state, error, None)
    if name == "ffa":
        return AggregateResult(ffa_aggregate(full, weights, frozen_a=global_state), error, None)
    return AggregateResult(fedavg(padded, weights), error, None)  # HetLoRA zero-padding if ranks differ


def private_aggregate(
    strategy: StrategyConfig,
    privacy: PrivacyConfig,
    global_state: dict[str, torch.Tensor],
    updates: Sequence[dict[str, torch.Tensor]],
    num_sampled: float,
    generator: torch.Generator,
) -> AggregateResult:
    """DP-FedAvg: global + (sum of clipped updates) / m + N(0, (z C / m)^2), equal weights.

    ``updates`` are the clients' clipped deltas on the tensors that travel (B only under
    FFA-LoRA); a sampled client that did not reply counts as a zero update (m stays fixed).
    """
    from fedft.privacy.dpfedavg import noisy_mean

    noisy = noisy_mean([{k: v.to(torch.float32) for k, v in u.items()} for u in updates],
                       num_sampled, privacy.clip_norm, privacy.noise_multiplier, generator,
                       poisson=privacy.poisson_clients, template=downlink_state(strategy, global_state))
    state = {k: v + noisy[k] if k in noisy else v for k, v in global_state.items()}
    full = [reply_to_full_state(strategy, global_state, {k: global_state[k] + v for k, v in u.items()})
            for u in updates]
    error = naive_aggregation_error(full, [1.0] * len(full)) if full else None
    return AggregateResult(dict(sorted(state.items())), error, None)
