"""SCAFFOLD (Karimireddy et al. 2020) on LoRA adapter tensors: control variates against client drift.

The server keeps a global control variate ``c`` and one per client ``c_i`` (all shaped like the
adapter). Each round a client gets its correction ``c - c_i`` beside the global adapter ``x``;
after every local optimizer step it moves its adapter by ``-lr * (c - c_i)`` (the correction is
applied to the update, after the optimizer: fedft's clients train with AdamW, whose normalised
step and a raw-gradient correction would not be in the same units). It reports its adapter
``y_i`` and ``lr_sum``, the sum of its learning rates over the round's steps. The server then
computes everything else (option II of the paper, so nothing but the adapter and one number
travels up):

    c_i+ = c_i - c + (x - y_i) / lr_sum          (the client's mean update direction)
    c+   = c + (1 / N) * sum over replying i of (c_i+ - c_i)       (N: all clients)
    x+   = x + server_lr * (weighted mean of y_i - x)              (FedAvg's weights)

With ``c = c_i = 0`` the correction is zero, local training is FedAvg's, and so is ``x+``.
A client the server has not seen has ``c_i = 0``. Pure tensor math; no flwr, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]


def zeros_like(state: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()}


def correction(c: Mapping[str, torch.Tensor], c_i: Mapping[str, torch.Tensor] | None) -> Tensors:
    """What one client adds to its update direction: ``c - c_i``."""
    return {k: v - c_i[k] if c_i is not None else v.clone() for k, v in c.items()}


def client_variate(c: Mapping[str, torch.Tensor], c_i: Mapping[str, torch.Tensor] | None,
                   x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], lr_sum: float) -> Tensors:
    """``c_i+ = c_i - c + (x - y) / lr_sum`` (option II): the client's new control variate."""
    if not lr_sum > 0:
        raise ValueError(f"lr_sum must be > 0, got {lr_sum}")
    old = c_i if c_i is not None else zeros_like(c)
    return {k: old[k] - c[k] + (x[k].float() - y[k].float()) / lr_sum for k in c}


def server_variate(c: Mapping[str, torch.Tensor], old: Sequence[Mapping[str, torch.Tensor] | None],
                   new: Sequence[Mapping[str, torch.Tensor]], num_clients: int) -> Tensors:
    """``c+ = c + (1 / N) * sum_i (c_i+ - c_i)`` over the clients that replied (N: all clients)."""
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    out = {k: v.clone() for k, v in c.items()}
    for before, after in zip(old, new):
        for k in out:
            out[k] += (after[k] - (before[k] if before is not None else 0.0)) / num_clients
    return out


def lr_sum(learning_rate: float, multipliers: Sequence[float]) -> float:
    """The sum of a round's per-step learning rates (the schedule's multipliers times the base rate)."""
    return float(learning_rate * sum(multipliers))


class ControlVariates:
    """The server's ``c`` and every client's ``c_i``, updated from one round's replies."""

    def __init__(self, template: Mapping[str, torch.Tensor]) -> None:
        self.c = zeros_like(template)
        self.clients: dict[int, Tensors] = {}

    def correction_for(self, client: int) -> Tensors:
        return correction(self.c, self.clients.get(client))

    def update(self, x: Mapping[str, torch.Tensor], replies: Mapping[int, tuple[Mapping[str, torch.Tensor], float]],
               num_clients: int) -> None:
        """Fold in one round: ``replies`` maps a client to (its adapter y_i, its lr_sum)."""
        old = [self.clients.get(client) for client in replies]
        new = [client_variate(self.c, self.clients.get(client), x, y, lr) for client, (y, lr) in replies.items()]
        self.c = server_variate(self.c, old, new, num_clients)
        self.clients.update(dict(zip(replies, new)))

    def to_tensors(self) -> Tensors:
        """Flat tensors for a checkpoint: ``c/NAME`` and ``client/ID/NAME``."""
        out = {f"c/{k}": v for k, v in self.c.items()}
        for client, state in self.clients.items():
            out.update({f"client/{client}/{k}": v for k, v in state.items()})
        return out

    def restore(self, saved: Mapping[str, torch.Tensor]) -> None:
        c = {k[2:]: v for k, v in saved.items() if k.startswith("c/")}
        if c:
            self.c = c
        for key, value in saved.items():
            if key.startswith("client/"):
                _, client, name = key.split("/", 2)
                self.clients.setdefault(int(client), {})[name] = value
