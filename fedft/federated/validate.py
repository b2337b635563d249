"""Which replies the server accepts: pure checks, no flwr.

(What may leave a client is checked in ``fedft.federated.outgoing``, which needs no torch.)
``reply_problem``: a reply whose tensor names differ from the adapter's, whose
shapes are not a LoRA adapter of rank 1..lora.r, whose dtype is not the wire dtype, whose
values are not finite, or whose update norm exceeds ``strategy.max_update_norm`` is named
with its reason and left out of the aggregate.
"""

from __future__ import annotations

import torch

from fedft.config import PrivacyConfig, StrategyConfig
from fedft.federated.exchange import wire_dtype
from fedft.federated.lora_aggregate import adapter_rank, b_only, truncate_to_rank
from fedft.federated.wire import LORA_A
from fedft.privacy.dpfedavg import adapter_delta, update_norm


def reply_problem(strategy: StrategyConfig, privacy: PrivacyConfig, global_state: dict[str, torch.Tensor],
                  reply: dict[str, torch.Tensor]) -> str | None:
    """Why the server must not aggregate this reply, or None if it is acceptable.

    ``strategy`` gives the aggregation, wire dtype and update-norm bound; ``privacy`` whether the
    reply is a DP-FedAvg delta (``change_norm``).
    """
    expected = b_only(global_state) if strategy.aggregation == "ffa" else global_state
    if set(reply) != set(expected):
        unexpected, missing = sorted(set(reply) - set(expected)), sorted(set(expected) - set(reply))
        return f"unexpected tensors {unexpected[:3]}, missing {missing[:3]}"
    ranks = set()
    for key, tensor in reply.items():
        like = expected[key]
        if tensor.dtype != wire_dtype(strategy):
            return f"{key}: dtype {tensor.dtype}, expected {wire_dtype(strategy)}"
        if tensor.dim() != 2:
            return f"{key}: shape {tuple(tensor.shape)} is not a matrix"
        if f".{LORA_A}." in key:
            fixed, rank = tensor.shape[1] == like.shape[1], tensor.shape[0]
        else:
            fixed, rank = tensor.shape[0] == like.shape[0], tensor.shape[1]
        if not fixed or not 1 <= rank <= like.shape[0 if f".{LORA_A}." in key else 1]:
            return f"{key}: shape {tuple(tensor.shape)} does not fit {tuple(like.shape)}"
        ranks.add(rank)
        if not torch.isfinite(tensor).all():
            return f"{key}: non-finite values"
    if len(ranks) > 1:
        return f"layers have different ranks {sorted(ranks)}"
    bound = strategy.max_update_norm
    if bound > 0:
        norm = change_norm(privacy, global_state, reply, ranks.pop())
        if norm > bound:
            return f"update norm {norm:.4g} above strategy.max_update_norm = {bound:g}"
    return None


def change_norm(privacy: PrivacyConfig, global_state: dict[str, torch.Tensor], reply: dict[str, torch.Tensor],
                rank: int) -> float:
    """L2 norm of what the reply changes: the reply itself under DP-FedAvg (``privacy.user_level``:
    it is a delta), else the reply minus the global adapter cut to the client's rank."""
    if privacy.user_level:
        return update_norm(reply)
    base = truncate_to_rank(global_state, rank) if rank < adapter_rank(global_state) else global_state
    return update_norm(adapter_delta(reply, base))
