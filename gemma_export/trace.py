"""The two traced entry points, shared by the converters.

Names are fixed across formats: inputs `tokens` (int32 [1, T]), `pos` (int32 [1], position of
tokens[0]), `length` (int32 [1], valid tokens of a prefill chunk; decode has none), and for formats
that pass the cache across the boundary `k_cache_{i}` / `v_cache_{i}`; outputs `logits`
(float32 [1, T, V]) and `k_cache_{i}_out` / `v_cache_{i}_out`.
"""

from __future__ import annotations

import torch
from torch import nn

PREFILL = "prefill"
DECODE = "decode"


def cache_names(num_layers: int) -> list[str]:
    return [f"{kv}_cache_{i}" for i in range(num_layers) for kv in ("k", "v")]


class CacheIO(nn.Module):
    """Step with the KV cache as explicit inputs and outputs (ONNX, TFLite)."""

    def __init__(self, model, decode: bool):
        super().__init__()
        self.model = model
        self.decode = decode
        self.names = cache_names(model.cfg.num_layers)

    def forward(self, tokens, pos, length=None, **caches):
        if self.decode:
            length = torch.ones(1, dtype=torch.int32)
        logits, new = self.model.step(tokens, pos, length, [caches[n] for n in self.names])
        return {"logits": logits, **{f"{n}_out": t for n, t in zip(self.names, new)}}


def sample_inputs(model, t: int, decode: bool, with_cache: bool = True) -> dict[str, torch.Tensor]:
    inputs = {
        "tokens": torch.zeros(1, t, dtype=torch.int32),
        "pos": torch.zeros(1, dtype=torch.int32),
    }
    if not decode:
        inputs["length"] = torch.full((1,), t, dtype=torch.int32)
    if with_cache:
        dtype = model.dtype
        for name, shape in zip(cache_names(model.cfg.num_layers), model.cache_shapes()):
            inputs[name] = torch.zeros(shape, dtype=dtype)
    return inputs


def describe_io(inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> dict:
    def d(ts):
        return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in ts.items()]

    return {"inputs": d(inputs), "outputs": d(outputs)}
