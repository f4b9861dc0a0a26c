"""4-bit codes two per byte: the one implementation of nibble packing every backend uses.

Codes are packed in row-major order, the even element of each pair in the low nibble. Two
spellings of a nibble exist in the runtimes: two's complement (`offset=False`: ONNX INT4 tensors,
TFLite INT4 tensors) and code + 8 (`offset=True`: onnxruntime's MatMulNBits, XNNPACK's qb4w).
"""

from __future__ import annotations

import numpy as np


def pack_int4(codes: np.ndarray, offset: bool = False) -> np.ndarray:
    """int4 codes (any shape, values in [-8, 7]) -> uint8 bytes, the last axis halved when it is
    even (an odd total is padded with one zero nibble and flattened)."""
    q = np.asarray(codes)
    nib = ((q.astype(np.int16) + 8) if offset else q.astype(np.int16)).astype(np.uint8) & 0x0F
    if q.ndim and q.shape[-1] % 2 == 0:
        return np.ascontiguousarray(nib[..., 0::2] | (nib[..., 1::2] << 4))
    flat = nib.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: np.ndarray, count: int | None = None, offset: bool = False) -> np.ndarray:
    """The inverse of pack_int4: int8 codes, the last axis doubled (or the first `count` codes of
    the flattened bytes)."""
    b = np.asarray(packed, dtype=np.uint8)
    nib = np.stack((b & 0x0F, b >> 4), axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1]) if b.ndim else b
    codes = nib.astype(np.int16) - 8 if offset else np.where(nib > 7, nib.astype(np.int16) - 16, nib)
    codes = codes.astype(np.int8)
    return codes.reshape(-1)[:count] if count is not None else codes
