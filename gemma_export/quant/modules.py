"""Quantized modules: integer codes and scales with the reference semantics of each scheme.

`QLinear` and `QEmbedding` (tied to the head by `TiedQHead`) hold what `quantize_` computed and
evaluate it in plain float ops: weights as codes x scales, activations quantized as the scheme
says. Backends lower these modules; how a runtime spells them is the backend's business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import dequantize, qrange
from .recipes import Scheme


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 activations (asymmetric per token) in plain float ops: the reference
    semantics, and exactly what the ONNX graph computes."""
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    zero = torch.round(-128.0 - lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, -128, 127)
    return (q - zero) * scale



def fake_quant_static(x: torch.Tensor, act_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Static activations: symmetric per-tensor int8/int16 with a scale calibrated ahead of time."""
    lo, hi = qrange(bits)
    return torch.clamp(torch.round(x / act_scale), lo, hi) * act_scale


def quantize_activations(x: torch.Tensor, activations: str, act_scale: torch.Tensor | None) -> torch.Tensor:
    """The scheme's activation quantization as plain float ops (the reference semantics)."""
    if activations == "int8-dynamic":
        return fake_quant_int8_per_token(x)
    if activations == "int8-static":
        return fake_quant_static(x, act_scale, 8)
    if activations == "int16-static":
        return fake_quant_static(x, act_scale, 16)
    return x


def quantized_linear(x, q, scale, scheme: Scheme, act_scale=None, zero=None):
    """x @ ((codes - zero) x scales)^T with the scheme's activation quantization."""
    return dense_linear(x, dequantize(q, scale, zero), scheme, act_scale)


def dense_linear(x, w, scheme: Scheme, act_scale=None):
    """`quantized_linear` with the weights already dequantized."""
    return F.linear(quantize_activations(x, scheme.activations, act_scale), w.to(x.dtype))


def _zero_point(scale: torch.Tensor, scheme: Scheme, zero: torch.Tensor | None) -> torch.Tensor:
    """Symmetric schemes: int8 zeros (torchao's affine form); source codes with minimums: fp32."""
    if scheme.symmetric:
        return torch.zeros_like(scale, dtype=torch.int8)
    if zero is None or zero.shape != scale.shape:
        raise ValueError("an asymmetric scheme needs one zero point per scale")
    return zero.to(torch.float32)


class QLinear(nn.Module):
    """A linear layer holding integer codes and scales (no bias; Gemma has none)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, act_scale: float = 0.0,
                 zero: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", _zero_point(scale, scheme, zero))
        self.register_buffer("act_scale", torch.tensor(float(act_scale)))  # static activations only
        self.scheme = scheme
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @property
    def zero(self) -> torch.Tensor | None:
        return None if self.scheme.symmetric else self.zero_point

    def weight_float(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero)

    def forward(self, x):
        return quantized_linear(x, self.qweight, self.scale, self.scheme, self.act_scale, self.zero)


class DequantizedLinear(nn.Module):
    """A QLinear whose weights are dequantized once, for running it on many inputs in a row (the
    calibration walk); the same numbers as the QLinear's forward."""

    def __init__(self, linear: QLinear):
        super().__init__()
        self.linear, self.weight = linear, linear.weight_float()

    def forward(self, x):
        return dense_linear(x, self.weight, self.linear.scheme, self.linear.act_scale)


class QEmbedding(nn.Module):
    """The token table as integer codes with per-row (or per-block) scales; tied to the head."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, zero: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", _zero_point(scale, scheme, zero))
        self.register_buffer("act_scale", torch.tensor(0.0))  # the head's input, static schemes only
        self.scheme = scheme
        self.embedding_dim = qweight.shape[1]

    @property
    def zero(self) -> torch.Tensor | None:
        return None if self.scheme.symmetric else self.zero_point

    def forward(self, ids):
        rows = F.embedding(ids, self.qweight).to(torch.float32)  # gather the codes, then scale
        block = self.embedding_dim // self.scale.shape[1]
        if self.zero is not None:
            rows = rows - F.embedding(ids, self.zero).repeat_interleave(block, dim=-1)
        return rows * F.embedding(ids, self.scale).to(torch.float32).repeat_interleave(block, dim=-1)

    @property
    def weight(self):  # the dequantized table
        return dequantize(self.qweight, self.scale, self.zero)


class TiedQHead(nn.Module):
    """The output head reusing the embedding's codes and scales (stored once)."""

    def __init__(self, embedding: QEmbedding):
        super().__init__()
        self.embedding = [embedding]  # not a submodule: its buffers belong to the embedding

    def forward(self, x):
        e = self.embedding[0]
        return quantized_linear(x, e.qweight, e.scale, e.scheme, e.act_scale, e.zero)
