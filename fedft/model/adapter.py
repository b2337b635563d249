"""Adapter tensors in and out of a PEFT model, and the adapter saved in PEFT format.

Only these tensors (``get_adapter_state``) ever leave a client. ``save_adapter`` writes a
PEFT directory (adapter_config.json + adapter_model.safetensors) in one rename.
"""

from __future__ import annotations

from pathlib import Path

import torch


def get_adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors as detached float32 CPU copies, in a stable order."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sorted(state.items())}


def set_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into ``model``; every key must match, in name and shape."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors do not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"adapter tensor {key}: shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[key].shape)}")
    set_peft_model_state_dict(model, state)


def adapter_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the adapter's tensor data (what an ideal wire format would send)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(model, state: dict[str, torch.Tensor], out_dir: Path,
                 extras: dict[str, bytes] | None = None) -> Path:
    """Write ``state`` in PEFT format (adapter_config.json + adapter_model.safetensors).

    ``extras`` (file name -> bytes) are written into the same directory, which appears in
    one rename: a checkpoint is either complete or absent.
    """
    from fedft.rundir import atomic_directory

    set_adapter_state(model, state)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name, data in (extras or {}).items():
            (Path(tmp) / name).write_bytes(data)
    return out_dir
