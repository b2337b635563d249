"""Adapter tensors in and out of a PEFT model, and the adapter saved in PEFT format.

Only these tensors (``get_adapter_state``) ever leave a client. ``save_adapter`` writes a
PEFT directory (adapter_config.json + adapter_model.safetensors) in one rename.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its adapters, name -> parameter)


def adapter_parameters(model) -> dict[str, torch.nn.Parameter] | None:
    """PEFT's adapter state names mapped to the model's parameters that hold those tensors.

    Found once per model (and set of adapters) from ``get_peft_model_state_dict``, whose
    tensors share storage with the parameters; afterwards reading and writing the adapter
    skips PEFT's walk over the whole model's state dict (about 60 ms a call on the demo model,
    several times per round). None when some adapter tensor is not a parameter of its own:
    then PEFT's functions do the work.
    """
    adapters = tuple(getattr(model, "peft_config", {}))
    cached = _PARAMETERS.get(model)
    if cached is not None and cached[0] == adapters:
        return cached[1]
    from peft import get_peft_model_state_dict

    by_storage = {p.data_ptr(): p for p in model.parameters()}
    state = get_peft_model_state_dict(model)
    found = {key: by_storage.get(tensor.data_ptr()) for key, tensor in state.items()}
    unique = len({id(p) for p in found.values()}) == len(found)
    mapping = found if unique and all(p is not None and p.shape == state[k].shape for k, p in found.items()) else None
    _PARAMETERS[model] = (adapters, mapping)
    return mapping


def get_adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors as detached float32 CPU copies, in a stable order."""
    params = adapter_parameters(model)
    if params is None:
        from peft import get_peft_model_state_dict

        params = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sorted(params.items())}


def set_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into ``model``; every key must match, in name and shape."""
    params = adapter_parameters(model)
    if params is None:
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model)
    else:
        expected = params
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
    if params is None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor)


def adapter_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the adapter's tensor data (what an ideal wire format would send)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(model, state: dict[str, torch.Tensor], out_dir: Path,
                 extras: dict[str, bytes] | None = None, *, model_card: bool = True) -> Path:
    """Write ``state`` in PEFT format (adapter_config.json + adapter_model.safetensors).

    ``extras`` (file name -> bytes) are written into the same directory, which appears in
    one rename: a checkpoint is either complete or absent. Without ``model_card`` PEFT's
    README.md is left out (a checkpoint's: PEFT renders it from a template on every save,
    half of the 30 ms a demo checkpoint took; the run's final adapter keeps it).
    """
    from fedft.rundir import atomic_directory

    set_adapter_state(model, state)
    with atomic_directory(out_dir) as tmp, _model_card(model, model_card):
        model.save_pretrained(tmp, safe_serialization=True)
        for name, data in (extras or {}).items():
            (Path(tmp) / name).write_bytes(data)
    return out_dir


@contextmanager
def _model_card(model, wanted: bool) -> Iterator[None]:
    """While open and unless ``wanted``, PEFT's ``save_pretrained`` writes no README.md (its
    ``create_or_update_model_card`` is shadowed on this model object only)."""
    if wanted:
        yield
        return
    model.create_or_update_model_card = lambda output_dir: None
    try:
        yield
    finally:
        del model.create_or_update_model_card
