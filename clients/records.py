"""Adapter tensors in and out of Flower's ArrayRecord, with fedft's cached .npy headers.

Same bytes as ``ArrayRecord(torch_state_dict=...)`` and ``to_torch_state_dict()`` (each Array a
.npy file, fedft.federated.tensor_bytes), about ten times faster for an adapter's many small
tensors. server/records.py is the ServerApp's twin (the server and client packages do not
import each other).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord

from fedft.federated.tensor_bytes import NUMPY_STYPE, decode_tensor, encode_tensor


def to_array_record(state: dict) -> ArrayRecord:
    """An ArrayRecord holding ``state``'s tensors, in its order."""
    record = ArrayRecord()
    for name, tensor in state.items():
        dtype, shape, data = encode_tensor(tensor)
        record[name] = Array(dtype=dtype, shape=shape, stype=NUMPY_STYPE, data=data)
    return record


def to_state_dict(record: ArrayRecord) -> dict:
    """The tensors in ``record``, in its order (what ``record.to_torch_state_dict()`` gives)."""
    return {name: decode_tensor(array.stype, array.data) for name, array in record.items()}
