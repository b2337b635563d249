"""Adapter tensors as the ``.npy`` bytes Flower's arrays carry, without ``np.save`` / ``np.load`` each time.

A Flower ``Array`` of stype ``numpy.ndarray`` holds a complete ``.npy`` file: a header (format,
dtype, shape) and the raw numbers. Flower writes one with ``np.save`` and reads one with
``np.load``; for the demo's adapter (56 tensors, 1.26 MB) that is 2.2 ms to a record and 2.8 ms
back on an idle core (``python -m simulations.bench_records``), on both sides of every
downlink and reply. The header depends only on dtype and shape, so
``encode_tensor`` writes it once per (dtype, shape) with numpy's own header writer and appends
the numbers; ``decode_tensor`` parses a header once per distinct header (numpy's own parser)
and checks the byte count before it reads the numbers. The bytes are the ``.npy`` format, so
either side may be Flower's own conversion. A header this module does not read (another
format version, an object dtype) goes to ``np.load`` with ``allow_pickle=False``, which reads
or refuses it as Flower would. ``fill_array_record`` and ``state_from_record`` do this for a
whole adapter, for the ServerApp and the ClientApp alike; they take Flower's record and array
types from the caller, so this module stays pure (bytes in, tensors out) and imports no flwr.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch

NUMPY_STYPE = "numpy.ndarray"  # Flower's SType.NUMPY: the data is a .npy file
_MAGIC_LENGTH = 8  # b"\x93NUMPY" + major + minor
_HEADER_LENGTH_BYTES = {(1, 0): 2, (2, 0): 4}  # little-endian length of the header dict that follows


@lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header ``np.save`` writes for a C-ordered array of this dtype and shape."""
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


def encode_tensor(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype name, shape, .npy bytes) of ``tensor``, as Flower's ``Array.from_torch_tensor`` has them."""
    array = tensor.detach().cpu().numpy()
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would also turn a 0-d array into 1-d)
        array = np.ascontiguousarray(array)
    shape = tuple(int(n) for n in array.shape)
    return str(array.dtype), shape, _npy_header(array.dtype, shape) + array.data  # one copy: bytes + buffer


@lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool] | None:
    """dtype, shape and Fortran order of a .npy header; None where ``np.load`` should decide."""
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran_order, dtype = read[version](stream)
    except (KeyError, ValueError):
        return None
    if dtype.hasobject:
        return None
    return dtype, tuple(shape), bool(fortran_order)


def decode_tensor(stype: str, data: bytes) -> torch.Tensor:
    """The tensor in a Flower array's .npy bytes (a writable copy); raises what ``Array.numpy`` raises."""
    if stype != NUMPY_STYPE:
        raise TypeError(f"Unsupported serialization type for numpy conversion: '{stype}'")
    return torch.from_numpy(_decode_npy(data))


def _decode_npy(data: bytes) -> np.ndarray:
    version = (data[6], data[7]) if len(data) >= _MAGIC_LENGTH else None
    width = _HEADER_LENGTH_BYTES.get(version)
    if width is not None and len(data) >= _MAGIC_LENGTH + width:
        start = _MAGIC_LENGTH + width
        end = start + int.from_bytes(data[_MAGIC_LENGTH:start], "little")
        parsed = _parse_header(bytes(data[:end])) if end <= len(data) else None
        if parsed is not None:
            dtype, shape, fortran_order = parsed
            count = int(np.prod(shape, dtype=np.int64))
            if len(data) - end == count * dtype.itemsize:
                flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
                return flat.reshape(shape, order="F" if fortran_order else "C").copy()
    return np.load(io.BytesIO(data), allow_pickle=False)  # reads what the fast path does not, or refuses it


def fill_array_record(record: Any, state: Mapping[str, torch.Tensor], array_type: type) -> Any:
    """``record`` (an empty Flower ``ArrayRecord``) holding ``state``'s tensors in its order, each an
    ``array_type`` (Flower's ``Array``): the bytes of ``ArrayRecord(torch_state_dict=state)``."""
    for name, tensor in state.items():
        dtype, shape, data = encode_tensor(tensor)
        record[name] = array_type(dtype=dtype, shape=shape, stype=NUMPY_STYPE, data=data)
    return record


def state_from_record(record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors in a Flower ``ArrayRecord`` (name -> an array with ``stype`` and ``data``), in its
    order: what ``record.to_torch_state_dict()`` gives."""
    return {name: decode_tensor(array.stype, array.data) for name, array in record.items()}
