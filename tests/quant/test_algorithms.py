"""Rounding weights: round-to-nearest, the scale search and GPTQ, on their own objectives."""

import pytest
import torch

from gemma_export.errors import ConfigError
from gemma_export.quant.algorithms import (dequantize, gptq, inverse_factor, qrange, quantize_with, rtn_scales,
                                           search_scales)


def test_rtn_codes_are_in_range_and_zero_rows_get_a_nonzero_scale():
    w = torch.randn(8, 64)
    w[3] = 0.0
    s = rtn_scales(w, 4, 32)
    assert (s > 0).all()
    assert torch.equal(s, s.to(torch.bfloat16).float())  # bf16-representable
    q = quantize_with(w, s, 4)
    lo, hi = qrange(4)
    assert q.dtype == torch.int8 and q.min() >= lo and q.max() <= hi
    assert (dequantize(q, s) - w).abs().max() <= s.max() * 0.51


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_its_objective(act_order):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated inputs
    x = x * torch.rand(128, generator=g) * 4  # columns of different size (what act-order sorts by)
    h = 2 * x.T.double() @ x.double() / len(x)
    q, s = gptq(w, h, 4, 32, act_order=act_order)
    rtn = dequantize(quantize_with(w, s, 4), s)
    err_gptq = ((x @ (dequantize(q, s) - w).T) ** 2).mean()
    err_rtn = ((x @ (rtn - w).T) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_scale_search_lowers_the_weighted_rounding_error_per_block():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g) * torch.rand(64, 1, generator=g)
    imp = torch.rand(128, generator=g) ** 4  # a few columns matter much more than the rest

    def block_err(s):
        e = (dequantize(quantize_with(w, s, 4), s) - w) ** 2 * imp
        return e.reshape(64, 4, 32).sum(-1)

    rtn, found = rtn_scales(w, 4, 32), search_scales(w, 4, 32, importance=imp)
    assert torch.equal(found, found.to(torch.bfloat16).float())
    assert (block_err(found) <= block_err(rtn) + 1e-12).all()  # max-abs (ratio 1) is a candidate
    assert block_err(found).sum() < 0.85 * block_err(rtn).sum()
    # the weighting matters: searching without it does worse on the weighted objective
    assert block_err(found).sum() < block_err(search_scales(w, 4, 32)).sum()


@pytest.mark.parametrize("n", [40, 600])  # 600: the triangular inverse splits into halves
def test_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse(n):
    """GPTQ's error weights: one factorisation gives what factorise, invert, factorise gave."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    h = x.T @ x / n + 0.01 * torch.eye(n, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    got = inverse_factor(h)
    assert got.dtype == torch.float32 and torch.equal(got, got.triu())
    assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-4
    with pytest.raises(ConfigError, match="not positive definite"):
        inverse_factor(-h)
