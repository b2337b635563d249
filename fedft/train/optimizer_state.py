"""A client's AdamW moments carried from one round to its next (``train.keep_optimizer_state``).

By default every round starts a fresh AdamW: its first steps, with empty moments and bias
correction, move every coordinate by about the learning rate whatever the gradient's size.
Kept, the moments (and AdamW's step count) continue where the client's previous round left
them, as one optimizer would over all the client's steps; only the weights are replaced by
the server's adapter. The state never leaves the institution: it lives in the node's own
state (Flower's ``Context.state``, or the resident worker's memory), as bytes.

The state is keyed by adapter tensor name, so it survives a change of the parameters'
order; a tensor whose shape changed (another rank) starts fresh. Nothing here knows Flower.
"""

from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def trainable_names(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Each trainable parameter with its adapter tensor name (as the adapter state spells it)."""
    return [(name.replace(".default.", "."), param) for name, param in model.named_parameters() if param.requires_grad]


def saved_state(optimizer: torch.optim.Optimizer,
                named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter moments and step count as ``{name/moment: tensor}`` (CPU copies)."""
    out = {}
    for name, param in named:
        state = optimizer.state.get(param)
        if not state:
            continue
        for moment in MOMENTS:
            out[f"{name}/{moment}"] = state[moment].detach().to("cpu", copy=True)
        out[f"{name}/step"] = torch.as_tensor(state["step"], dtype=torch.float32).detach().cpu().reshape(())
    return out


def restore_state(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]],
                  saved: dict[str, torch.Tensor]) -> int:
    """Put ``saved`` moments back into ``optimizer`` (a fresh AdamW over these parameters); returns
    how many parameters got theirs (the others, new or reshaped, start fresh)."""
    restored = 0
    for name, param in named:
        moments = [saved.get(f"{name}/{moment}") for moment in MOMENTS]
        step = saved.get(f"{name}/step")
        if step is None or any(m is None or m.shape != param.shape for m in moments):
            continue
        state = {moment: m.to(param.device, param.dtype).clone() for moment, m in zip(MOMENTS, moments)}
        state["step"] = step.to(torch.float32).clone()
        optimizer.state[param] = state
        restored += 1
    return restored


def to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """``state`` as safetensors bytes (what the node state holds)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(bytes(data))
