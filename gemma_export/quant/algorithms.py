"""Rounding weights to integer codes: symmetric scales (max-abs, searched), round-to-nearest and GPTQ.

Codes are int8 tensors (4-bit codes use the range [-8, 7]); scales are rounded to
bfloat16-representable values, so the dequantized weights are the same numbers in every format's
scale dtype (bf16 for XNNPACK, fp16/fp32 elsewhere).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .recipes import Scheme

MIN_SCALE = 2.0**-14  # an all-zero row still gets a usable (non-zero, fp16-normal) scale


def block_for(scheme: Scheme, in_features: int) -> int:
    """The number of input columns one scale covers."""
    if scheme.granularity == "channel":
        return in_features
    if in_features % scheme.block_size:
        raise ConfigError(f"input size {in_features} is not a multiple of block size {scheme.block_size}")
    return scheme.block_size



def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def rtn_scales(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Symmetric scales [out, in/block]: max |w| of each block maps to the largest code."""
    out, inp = w.shape
    amax = w.float().reshape(out, inp // block, block).abs().amax(-1)
    scale = (amax / qrange(bits)[1]).clamp_min(MIN_SCALE)
    return scale.to(torch.bfloat16).float()


def search_scales(w: torch.Tensor, bits: int, block: int, importance: torch.Tensor | None = None,
                  ratios: torch.Tensor | None = None, rows: int = 8192) -> torch.Tensor:
    """Per-block scales that minimise the (importance-weighted) rounding error.

    Each block tries scales max|w| * r / qmax for r in `ratios` (r < 1 clips the largest values to
    spend the codes on the rest, and lets the most negative value use the extra code, -8 or -128).
    `importance` [in] weights each input column's squared error, e.g. the diagonal of the inputs'
    Hessian: columns that see large activations are rounded more carefully.
    """
    out, inp = w.shape
    nb = inp // block
    lo, hi = qrange(bits)
    ratios = torch.linspace(0.70, 1.0, 31) if ratios is None else ratios
    imp = (torch.ones(inp) if importance is None else importance.float()).reshape(1, nb, block)
    best = torch.empty(out, nb)
    for a in range(0, out, rows):
        wb = w[a:a + rows].float().reshape(-1, nb, block)
        amax = wb.abs().amax(-1)
        best_err, best_s = torch.full_like(amax, float("inf")), torch.empty_like(amax)
        # one work buffer, written in place: a fresh tensor per step made this loop several times slower
        work, err = torch.empty_like(wb), torch.empty_like(amax)
        for r in ratios.tolist():
            sc = (amax * r / hi).clamp_min(MIN_SCALE).to(torch.bfloat16).float()
            torch.div(wb, sc[..., None], out=work)
            work.round_().clamp_(lo, hi).mul_(sc[..., None])  # dequantized
            torch.sub(wb, work, out=work)
            torch.sum(work.square_().mul_(imp), -1, out=err)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, sc, best_s)
        best[a:a + rows] = best_s
    return best


def quantize_with(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    out, inp = w.shape
    lo, hi = qrange(bits)
    s = scale.repeat_interleave(inp // scale.shape[1], dim=1)
    return torch.clamp(torch.round(w.float() / s), lo, hi).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """(codes - zero) x scales; `zero` (float, per block) only for asymmetric source codes."""
    out, nb = scale.shape
    # one float copy of the codes, scaled in place by blocks: no weight-sized temporaries besides
    # it (the tied table of the larger models is a GiB in float)
    c = q.float().reshape(out, nb, q.shape[1] // nb)
    if zero is not None:
        c.sub_(zero.float()[..., None])
    return c.mul_(scale.float()[..., None]).reshape(q.shape)


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of h^-1 (h^-1 = U^T U), from one factorisation.

    With J the reversal permutation and J h J = L L^T, h = R R^T for the upper triangular R = J L J,
    so h^-1 = (R^-1)^T R^-1 and U = R^-1 = J L^-1 J: one Cholesky and one triangular inverse instead
    of factorise, invert and factorise again. The factor is computed in float64 (in an A/B run on the
    real 270M a float32 factor raised the calibrated model's KL, float32 Hessian sums did not; see
    the README) and returned in float32 for the column loop.
    """
    l, info = torch.linalg.cholesky_ex(h.double().flip(0, 1))
    if info.item() != 0:
        raise ConfigError("the calibration Hessian is not positive definite even after damping")
    return _lower_inverse(l).flip(0, 1).float()


def _lower_inverse(l: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """Inverse of a lower triangular matrix by halves, [[A, 0], [B, C]]^-1 =
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]]: the work goes to matrix products, which run near the
    machine's peak, where one triangular solve against the identity does not."""
    n = l.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(l, torch.eye(n, dtype=l.dtype), upper=False)
    m = n // 2
    a, c = _lower_inverse(l[:m, :m], leaf), _lower_inverse(l[m:, m:], leaf)
    out = torch.zeros_like(l)
    out[:m, :m], out[m:, m:] = a, c
    out[m:, :m] = -(c @ (l[m:, :m] @ a))
    return out


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, block: int, damp: float = 0.01,
         step: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with static per-block scales (the searched grid, chosen before rounding).

    Columns are rounded left to right; each rounding error is spread over the columns not yet
    rounded, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).
    `act_order` rounds the columns with the largest inputs first (descending Hessian diagonal), so
    their errors are compensated by the most columns; the scales stay those of the original blocks.
    """
    w = w.float().clone()
    scale = search_scales(w, bits, block, importance=torch.diag(hessian))
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    n = w.shape[1]
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, order], h[order][:, order]
    col_block = order // block  # each (reordered) column keeps its original block's scale
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = inverse_factor(h)
    lo, hi = qrange(bits)
    q = torch.empty_like(w)
    col_scale = scale[:, col_block]  # [out, n]: each column's scale, gathered once
    for a in range(0, n, step):
        b = min(a + step, n)
        w1, err1, hinv1, s1 = w[:, a:b].clone(), torch.empty_like(w[:, a:b]), hinv[a:b, a:b], col_scale[:, a:b]
        for i in range(b - a):
            col, s = w1[:, i], s1[:, i]
            qc = torch.round(col / s).clamp_(lo, hi)
            q[:, a + i] = qc
            e = (col - qc * s).div_(hinv1[i, i])
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)
            err1[:, i] = e
        w[:, b:] -= err1 @ hinv[a:b, b:]
    out = torch.empty_like(q, dtype=torch.int8)
    out[:, order] = q.to(torch.int8)
    return out, scale


def quantize_weight(w: torch.Tensor, scheme: Scheme, hessian: torch.Tensor | None = None):
    """(codes int8 [out, in], scales [out, in/block]) of one weight matrix by the scheme's algorithm
    (see recipes.ALGORITHMS); the calibrated algorithms need the Hessian of the layer's inputs."""
    block = block_for(scheme, w.shape[1])
    if scheme.algorithm in ("gptq", "gptq-act"):
        return gptq(w, hessian, scheme.bits, block, act_order=scheme.algorithm == "gptq-act")
    if scheme.algorithm == "search":
        s = search_scales(w, scheme.bits, block, importance=torch.diag(hessian))
    else:
        s = rtn_scales(w, scheme.bits, block)
    return quantize_with(w, s, scheme.bits), s
