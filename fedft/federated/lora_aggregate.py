"""Exact aggregation of LoRA adapters: pure functions over ``{name: tensor}`` states.

A LoRA layer adds ``s * B @ A`` to a frozen weight (B: out x r, A: r x in, s = alpha / r).
Averaging A and B separately (``fedft.federated.aggregate.fedavg``) does not average the updates:
mean(B) @ mean(A) != mean(B @ A). This module offers the exact alternatives:

- ``ffa``: FFA-LoRA (Sun et al. 2024). A stays at its seeded initialisation on every
  client and only B trains, so mean(B) @ A = mean(B @ A) exactly, and only B travels.
- ``svd``: the weighted sum of products per layer, sum_k w_k B_k A_k, re-factored to rank r
  by a truncated SVD (FlexLoRA, Bai et al. 2024). The product is never formed densely:
  the stacked factors are reduced by two thin QRs to a (K r) x (K r) core, so the cost is
  O((out + in) (K r)^2) per layer, fine for 7B-size layers. The discarded spectral energy
  is returned.
- heterogeneous ranks: ``pad_to_rank`` (HetLoRA-style zero padding for the naive average)
  and ``truncate_to_rank`` (a client's share of a global adapter; with ``svd`` the global
  factors are in SVD order, so the first r_k components are the best rank-r_k update).

Every client uses alpha proportional to its rank (``fedft.model``), so s is the same for
all and the factors can be combined without rescaling. No I/O, no randomness, no flwr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedft.federated.aggregate import normalized_weights
from fedft.federated.wire import LORA_A, LORA_B


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Map each LoRA layer to its (A key, B key); every A must have its B and vice versa."""
    pairs = {}
    for key in state:
        if f".{LORA_A}." in key:
            b_key = key.replace(f".{LORA_A}.", f".{LORA_B}.")
            if b_key not in state:
                raise ValueError(f"adapter tensor {key} has no matching {b_key}")
            pairs[key.replace(f".{LORA_A}.", ".")] = (key, b_key)
        elif f".{LORA_B}." in key and key.replace(f".{LORA_B}.", f".{LORA_A}.") not in state:
            raise ValueError(f"adapter tensor {key} has no matching lora_A tensor")
    if not pairs:
        raise ValueError("no LoRA tensors (names containing '.lora_A.' / '.lora_B.') in the adapter")
    return pairs


def b_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The B factors of an adapter: all that travels under FFA-LoRA."""
    return {k: v for k, v in state.items() if f".{LORA_B}." in k}


def _factors(states, weights, a_key, b_key) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors P (out x Kr), Q (Kr x in) with P @ Q = sum_k w_k B_k A_k (float64)."""
    p = torch.cat([w * s[b_key].to(torch.float64) for w, s in zip(weights, states)], dim=1)
    q = torch.cat([s[a_key].to(torch.float64) for s in states], dim=0)
    return p, q


def lowrank_frobenius_sq(p: torch.Tensor, q: torch.Tensor) -> float:
    """||P @ Q||_F^2 without forming P @ Q: sum((P^T P) * (Q Q^T))."""
    return float(((p.T @ p) * (q @ q.T)).sum())


@dataclass(frozen=True)
class SvdResult:
    """A re-factored global adapter and how much of the exact sum the rank cut discarded."""

    state: dict[str, torch.Tensor]
    discarded_energy: float  # sum of dropped sigma^2 / sum of all sigma^2, over all layers


def svd_aggregate(
    states: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
    rank: int,
    a_row_norms: dict[str, float] | None = None,
) -> SvdResult:
    """Best rank-``rank`` factors of sum_k w_k B_k A_k per layer (clients may differ in rank).

    Singular components come in decreasing order. By default B = U_r sqrt(S_r) and
    A = sqrt(S_r) V_r^T. With ``a_row_norms`` (A key -> norm) every row of A gets that
    norm instead, A = c V_r^T and B = U_r S_r / c: the same product, but A keeps the scale
    of a LoRA initialisation. This matters for training: early in a run the product is
    small, and balanced factors would make both A and B small, and with them every
    gradient of B (which is proportional to A). Non-LoRA tensors (none in a plain LoRA
    adapter) are averaged with the same weights.
    """
    shares = normalized_weights(weights)
    if len(shares) != len(states):
        raise ValueError(f"{len(states)} client states but {len(shares)} weights")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    pairs = lora_pairs(states[0])
    out: dict[str, torch.Tensor] = {}
    dropped = total = 0.0
    for a_key, b_key in pairs.values():
        p, q = _factors(states, shares, a_key, b_key)
        q_b, r_b = torch.linalg.qr(p)  # p = q_b r_b
        q_a, r_a = torch.linalg.qr(q.T)  # q = r_a^T q_a^T
        u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)
        dropped += float((sigma[rank:] ** 2).sum())
        total += float((sigma ** 2).sum())
        keep = min(rank, sigma.numel())
        if a_row_norms is not None:
            scale = float(a_row_norms[a_key])
            b = (q_b @ u[:, :keep]) * (sigma[:keep] / scale)
            a = scale * (vh[:keep] @ q_a.T)
        else:
            root = sigma[:keep].sqrt()
            b = (q_b @ u[:, :keep]) * root
            a = root[:, None] * (vh[:keep] @ q_a.T)
        if keep < rank:  # the exact sum has lower rank than asked: pad with idle components
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - keep)], dim=1)
            a = torch.cat([a, _idle_rows(a, rank - keep, a_row_norms and float(a_row_norms[a_key]))], dim=0)
        out[b_key] = b.to(torch.float32)
        out[a_key] = a.to(torch.float32)
    lora_keys = {k for pair in pairs.values() for k in pair}
    for key in states[0]:
        if key not in lora_keys:
            out[key] = sum(w * s[key].to(torch.float64) for w, s in zip(shares, states)).to(torch.float32)
    return SvdResult(state=dict(sorted(out.items())), discarded_energy=dropped / total if total else 0.0)


def _idle_rows(a: torch.Tensor, count: int, row_norm: float | None) -> torch.Tensor:
    """Rows to pad A with: zeros, or (given a row norm) directions orthogonal to A's rows.

    A zero row with a zero B column never trains again (both gradients vanish), so when A
    keeps a LoRA-like scale the padding gets fixed pseudo-random orthogonal directions.
    """
    if not row_norm:
        return a.new_zeros(count, a.shape[1])
    fresh = torch.randn(count, a.shape[1], generator=torch.Generator().manual_seed(0), dtype=a.dtype)
    basis = torch.linalg.qr(a.T).Q.T if a.shape[0] else a  # orthonormal rows spanning A's rows
    fresh = fresh - (fresh @ basis.T) @ basis
    return row_norm * torch.linalg.qr(fresh.T).Q.T


def ffa_aggregate(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], frozen_a: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """FFA-LoRA: weighted mean of the B factors, A taken from the shared frozen initialisation."""
    from fedft.federated.aggregate import fedavg

    b = fedavg([b_only(s) for s in states], weights)
    return dict(sorted({**{k: v for k, v in frozen_a.items() if f".{LORA_A}." in k}, **b}.items()))


def naive_aggregation_error(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> float:
    """||mean(B A) - mean(B) mean(A)||_F / ||mean(B A)||_F over all layers together.

    0 when every client holds the same A (as under FFA-LoRA) and, exactly, for one client (not
    computed then: it cost ~10 ms a round on the demo); computed from factors only. Clients
    must share a rank (pad heterogeneous ones first).
    """
    if len(states) == 1:
        return 0.0
    shares = normalized_weights(weights)
    num = den = 0.0
    for a_key, b_key in lora_pairs(states[0]).values():
        p, q = _factors(states, shares, a_key, b_key)
        mean_b = sum(w * s[b_key].to(torch.float64) for w, s in zip(shares, states))
        mean_a = sum(w * s[a_key].to(torch.float64) for w, s in zip(shares, states))
        num += lowrank_frobenius_sq(torch.cat([p, -mean_b], dim=1), torch.cat([q, mean_a], dim=0))
        den += lowrank_frobenius_sq(p, q)
    return (max(num, 0.0) ** 0.5) / (den ** 0.5) if den > 0 else 0.0


def adapter_rank(state: dict[str, torch.Tensor]) -> int:
    """The LoRA rank of an adapter (rows of its A factors); all layers must agree."""
    ranks = {state[a].shape[0] for a, _ in lora_pairs(state).values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter layers have different ranks {sorted(ranks)}")
    return ranks.pop()


def pad_to_rank(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Zero-pad A (rows) and B (columns) to ``rank``: the same update, in a larger adapter."""
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        a, b = state[a_key], state[b_key]
        extra = rank - a.shape[0]
        if extra < 0:
            raise ValueError(f"{a_key}: rank {a.shape[0]} is above the target rank {rank}")
        out[a_key] = torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0)
        out[b_key] = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    return out


def truncate_to_rank(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The first ``rank`` components of every layer (a client's share of a larger adapter)."""
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        if state[a_key].shape[0] < rank:
            raise ValueError(f"{a_key}: rank {state[a_key].shape[0]} is below the requested {rank}")
        out[a_key] = state[a_key][:rank].clone()
        out[b_key] = state[b_key][:, :rank].clone()
    return out
