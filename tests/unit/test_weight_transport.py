"""How weights travel to the engine actors: packed as uint8 numpy views for Ray's object store
(:func:`rollout.vllm_worker.pack_tensor`), and as raw bytes for a multiprocess vLLM engine
(:func:`rollout.vllm_worker.encode_tensor`). Both must give back the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout.vllm_worker import decode_tensor, encode_tensor, pack_tensor, unpack_tensor

TENSORS = {
    "bf16 matrix": torch.randn(5, 3).to(torch.bfloat16),
    "fp32 vector": torch.randn(7),
    "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    "empty": torch.zeros(0, 4),
    "transposed": torch.randn(3, 4).t(),  # not contiguous
    "int64": torch.arange(6).reshape(2, 3),
}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("name", TENSORS)
def test_pack_round_trip_is_bit_exact(name):
    tensor = TENSORS[name]
    packed = pack_tensor(tensor)
    assert isinstance(packed[2], np.ndarray) and packed[2].dtype == np.uint8  # out of band in Ray
    assert same_bits(unpack_tensor(*packed), tensor.contiguous())


def test_unpack_shares_a_read_only_buffer_without_copy_or_warning(recwarn):
    raw = pack_tensor(torch.randn(4, 4).to(torch.bfloat16))[2].copy()
    raw.flags.writeable = False  # as Ray returns it from the object store
    tensor = unpack_tensor("bfloat16", (4, 4), raw)
    assert tensor.data_ptr() == raw.ctypes.data
    assert not [w for w in recwarn if "not writable" in str(w.message)]


@pytest.mark.parametrize("name", TENSORS)
def test_encode_round_trip_is_bit_exact_and_owns_its_memory(name):
    tensor = TENSORS[name]
    dtype, shape, raw = encode_tensor(tensor)
    assert isinstance(raw, bytes)
    decoded = decode_tensor(dtype, shape, raw)
    assert same_bits(decoded, tensor.contiguous())
    if decoded.numel():
        decoded.view(-1)[0] = 0  # writable, and not the caller's tensor
        assert same_bits(decode_tensor(dtype, shape, raw), tensor.contiguous())
