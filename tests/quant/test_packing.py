"""Nibble packing: both spellings of a 4-bit code, against hand-computed bytes, and round trips."""

import numpy as np
import pytest

from gemma_export.quant.packing import pack_int4, unpack_int4


def test_two_spellings_of_the_same_codes():
    q = np.array([[-8, -7, 0, 7]], np.int8)
    offset = pack_int4(q, offset=True)  # code + 8: MatMulNBits, XNNPACK
    twos = pack_int4(q)  # two's complement: ONNX / TFLite INT4 tensors
    assert offset.tolist() == [[0 | (1 << 4), 8 | (15 << 4)]]
    assert twos.tolist() == [[8 | (9 << 4), 0 | (7 << 4)]]


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("shape", [(6, 32), (3, 2, 8), (7,)])
def test_round_trip(offset, shape):
    q = np.random.default_rng(0).integers(-8, 8, size=shape).astype(np.int8)
    packed = pack_int4(q, offset=offset)
    n = q.size
    if q.shape[-1] % 2 == 0:
        assert packed.shape == (*q.shape[:-1], q.shape[-1] // 2)
        assert np.array_equal(unpack_int4(packed, offset=offset), q)
    else:  # odd sizes are flattened and padded with one nibble
        assert packed.shape == ((n + 1) // 2,)
    assert np.array_equal(unpack_int4(packed.reshape(-1), n, offset=offset), q.reshape(-1))
