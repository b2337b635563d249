"""Adapter tensors as .npy bytes: the same bytes and tensors as Flower's own conversions, refusals included."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedft.federated.tensor_bytes import (
    NUMPY_STYPE,
    decode_tensor,
    encode_tensor,
    fill_array_record,
    state_from_record,
)

TENSORS = [torch.randn(8, 64), torch.randn(64, 8).to(torch.float16), torch.arange(6, dtype=torch.int64),
           torch.tensor(3.5), torch.zeros(0, 4), torch.randn(16, 4).t()]  # the last one is not contiguous


def flower_bytes(tensor: torch.Tensor) -> bytes:
    return Array(tensor).data


@pytest.mark.parametrize("tensor", TENSORS, ids=lambda t: f"{t.dtype}{tuple(t.shape)}")
def test_encoded_tensor_decodes_to_the_same_numbers_and_matches_np_save_for_contiguous_input(tensor):
    dtype, shape, data = encode_tensor(tensor)
    assert (dtype, shape) == (str(tensor.numpy().dtype), tuple(tensor.shape))
    if tensor.is_contiguous():
        assert data == flower_bytes(tensor)
    assert np.array_equal(np.load(io.BytesIO(data)), tensor.numpy())
    back = decode_tensor(NUMPY_STYPE, data)
    assert back.dtype == tensor.dtype and torch.equal(back, tensor)
    back.add_(1) if back.numel() else None  # a writable copy, not a view of the message's bytes


def test_fortran_ordered_and_version_2_files_decode_as_np_load_reads_them():
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    saved = io.BytesIO()
    np.save(saved, fortran)
    assert np.array_equal(decode_tensor(NUMPY_STYPE, saved.getvalue()).numpy(), fortran)
    version2 = io.BytesIO()
    np.lib.format.write_array(version2, np.arange(5, dtype=np.float64), version=(2, 0))
    assert np.array_equal(decode_tensor(NUMPY_STYPE, version2.getvalue()).numpy(), np.arange(5.0))


def _outcome(read):
    try:
        return "ok", read().tolist()
    except Exception as error:  # noqa: BLE001 - the point is to compare what each side raises
        return "error", type(error)


def test_broken_or_unsafe_bytes_get_what_flowers_np_load_gives():
    good = encode_tensor(torch.arange(4, dtype=torch.float32))[2]
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    cases = {"truncated": good[:-3], "trailing bytes": good + b"\0" * 4, "header only": good[:64],
             "not npy": b"hello world", "object dtype": pickled.getvalue(), "empty": b""}
    for name, data in cases.items():
        flower = Array(dtype="float32", shape=(4,), stype=NUMPY_STYPE, data=data)
        expected = _outcome(flower.numpy)
        assert _outcome(lambda: decode_tensor(NUMPY_STYPE, data).numpy()) == expected, name
    assert _outcome(lambda: decode_tensor(NUMPY_STYPE, pickled.getvalue()))[0] == "error"


def test_another_serialization_type_is_refused_like_flower_refuses_it():
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        decode_tensor("torch.save", encode_tensor(torch.ones(2))[2])


def test_records_carry_the_bytes_and_tensors_of_flowers_own_conversion():
    state = {f"layer.{i}.lora_{ab}.weight": torch.randn(4, 8) for i in range(3) for ab in "AB"}
    ours, flowers = fill_array_record(ArrayRecord(), state, Array), ArrayRecord(torch_state_dict=state)
    assert isinstance(ours, ArrayRecord)
    assert list(ours) == list(flowers) == list(state)
    for name in state:
        assert (ours[name].dtype, ours[name].shape, ours[name].stype, ours[name].data) == \
            (flowers[name].dtype, flowers[name].shape, flowers[name].stype, flowers[name].data)
    back = state_from_record(flowers)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
