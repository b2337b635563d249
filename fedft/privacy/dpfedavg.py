"""User-level DP-FedAvg (McMahan et al. 2018) over adapter tensors: pure math.

Each sampled client clips its update (new adapter minus the global adapter it received)
to L2 norm ``clip_norm`` over every tensor it sends, before anything leaves it. The server
sums the clipped updates, divides by the fixed number of *sampled* clients ``m`` (not by
the number that replied, and not by example counts: example-weighted averaging would let
one client's weight, and so its sensitivity, exceed C / m) and adds Gaussian noise with
standard deviation ``z * C / m`` to every coordinate. A client that drops out contributes
a zero update, which keeps the sensitivity at C / m.

The noise comes from ``secure_generator`` (seeded from the operating system's CSPRNG). A
seeded generator is accepted only when the caller passes one explicitly, which tests do.
No I/O, no flwr.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Sequence

import torch


def update_norm(update: dict[str, torch.Tensor]) -> float:
    """L2 norm of an update over all its tensors together."""
    return float(torch.sqrt(sum((v.to(torch.float64) ** 2).sum() for v in update.values())))


def clip_update(update: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], bool]:
    """Scale ``update`` so its L2 norm is at most ``clip_norm``; also say whether it was clipped."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = update_norm(update)
    if norm <= clip_norm:
        return dict(update), False
    scale = clip_norm / norm
    return {k: v * scale for k, v in update.items()}, True


def adapter_delta(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """new - old for the tensors in ``new`` (what a client sends under DP-FedAvg)."""
    missing = sorted(set(new) - set(old))
    if missing:
        raise ValueError(f"update has tensors the global adapter lacks: {missing[:3]}")
    return {k: new[k].to(torch.float32) - old[k].to(torch.float32) for k in new}


def secure_generator(seed: int | None = None) -> torch.Generator:
    """A torch generator seeded from ``secrets`` (OS CSPRNG), or a fixed seed with a loud warning.

    torch's Mersenne Twister is not a CSPRNG: its 64-bit seed is drawn fresh from the OS
    for every round, so an observer of past noise cannot predict the next round's.
    """
    generator = torch.Generator()
    if seed is None:
        generator.manual_seed(secrets.randbits(63))
    else:
        warnings.warn(
            "DP noise uses a FIXED seed: the noise is predictable and gives NO privacy. "
            "Use this only in tests.", stacklevel=2)
        generator.manual_seed(seed)
    return generator


def noisy_mean(
    clipped_updates: Sequence[dict[str, torch.Tensor]],
    num_sampled: float,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    *,
    poisson: bool = False,
    template: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """(sum of clipped updates) / m + N(0, (z C / m)^2) per coordinate.

    m is the number of clients sampled (fixed-size sampling) or, with ``poisson``, the
    expected number q N: then the sample may be larger than m, or empty, in which case the
    result is noise alone, shaped like ``template``.
    """
    if num_sampled <= 0 or (not poisson and len(clipped_updates) > num_sampled):
        raise ValueError(f"{len(clipped_updates)} updates from {num_sampled} sampled clients")
    if not clipped_updates and template is None:
        raise ValueError("no client updates to aggregate")
    std = noise_multiplier * clip_norm / num_sampled
    shapes = clipped_updates[0] if clipped_updates else template
    out = {}
    for key, like in shapes.items():
        total = sum((u[key].to(torch.float64) for u in clipped_updates),
                    torch.zeros(like.shape, dtype=torch.float64)) / num_sampled
        noise = torch.normal(0.0, 1.0, size=total.shape, generator=generator, dtype=torch.float64) * std
        out[key] = (total + noise).to(torch.float32)
    return out
