"""What backends trace: the entry points' names and example inputs, and traceable views of the model.

Names are fixed across formats: inputs `tokens` (int32 [1, T]), `pos` (int32 [1], position of
tokens[0]), `length` (int32 [1], valid tokens of a prefill chunk; decode has none), and for formats
that pass the cache across the boundary `k_cache_{i}` / `v_cache_{i}`; outputs `logits`
(float32 [1, T, V]), `k_cache_{i}_out` / `v_cache_{i}_out` and, in debug entry points,
`hidden_states` (the residual stream per layer, [L + 1, T, hidden]).

`float_twin` gives backends that convert float graphs and then write the integer codes into the
converted file (ONNX, TFLite) a model whose weights are exactly codes x scales.
"""

from __future__ import annotations

import torch
from torch import nn

from .gemma3 import family
from .quant.modules import QEmbedding, QLinear, quantize_activations

PREFILL = "prefill"
DECODE = "decode"
HIDDEN = "hidden_states"


def cache_names(num_layers: int) -> list[str]:
    return [f"{kv}_cache_{i}" for i in range(num_layers) for kv in ("k", "v")]


class CacheIO(nn.Module):
    """One step with the KV cache as explicit inputs and outputs (ONNX graphs, TFLite signatures).

    Called with keyword caches (`forward`, how signature converters name inputs) or a list
    (`step`). `hidden` adds the debug output; `logits=False` leaves out logits and the caches
    (a debug entry point returning only the hidden states).
    """

    def __init__(self, model, decode: bool, hidden: bool = False, logits: bool = True):
        super().__init__()
        self.model, self.decode, self.hidden, self.logits = model, decode, hidden, logits
        self.names = cache_names(model.cfg.num_layers)

    def step(self, tokens, pos, length, caches: list) -> dict:
        if self.decode:
            length = torch.ones(1, dtype=torch.int32)
        out = self.model.step(tokens, pos, length, caches, hidden=self.hidden)
        result = {"logits": out[0], **{f"{n}_out": t for n, t in zip(self.names, out[1])}} if self.logits else {}
        if self.hidden:
            result[HIDDEN] = out[2]
        return result

    def forward(self, tokens, pos, length=None, **caches):
        return self.step(tokens, pos, length, [caches[n] for n in self.names])


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


def sample_outputs(model, t: int, with_cache: bool = True) -> dict[str, torch.Tensor]:
    """Zeros shaped like an entry point's outputs (for describing it in the manifest)."""
    outs = {"logits": torch.zeros(1, t, model.cfg.vocab_size)}
    if with_cache:
        names = cache_names(model.cfg.num_layers)
        outs.update({f"{n}_out": torch.zeros(s) for n, s in zip(names, model.cache_shapes())})
    return outs


def describe_io(inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> dict:
    def d(ts):
        return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in ts.items()]

    return {"inputs": d(inputs), "outputs": d(outputs)}


# ----------------------------------------------------------------------------------------------
# The float twin of a quantized model
# ----------------------------------------------------------------------------------------------


class _FloatLinear(nn.Linear):
    """Float weights (exactly codes x scales) with the scheme's activation quantization as float ops."""

    def __init__(self, in_features: int, out_features: int, activations: str, act_scale: torch.Tensor):
        super().__init__(in_features, out_features, bias=False)
        self.activations = activations
        self.register_buffer("act_scale", act_scale.clone())

    def forward(self, x):
        return super().forward(quantize_activations(x, self.activations, self.act_scale))


def float_twin(model, activation_ops=True) -> dict:
    """Swap quantized modules back to float modules holding exactly the dequantized weights.

    Returns {parameter name: (codes int8, scales fp32, scheme, zero points or None)} for the backends that trace the
    float graph and then replace each weight by its codes. With `activation_ops=False` the
    activation quantization is left to the runtime's kernels; a callable decides per scheme.
    """
    keep = activation_ops if callable(activation_ops) else (lambda scheme: activation_ops)
    codes = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QLinear):
            lin = _FloatLinear(mod.in_features, mod.out_features,
                               mod.scheme.activations if keep(mod.scheme) else "float", mod.act_scale)
            lin.weight = nn.Parameter(mod.weight_float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
            codes[f"{name}.weight"] = (mod.qweight, mod.scale, mod.scheme, mod.zero)
    emb = getattr(model, family.TABLE)
    if isinstance(emb, QEmbedding):
        table = nn.Embedding(emb.qweight.shape[0], emb.embedding_dim)
        table.weight = nn.Parameter(emb.weight, requires_grad=False)
        setattr(model, family.TABLE, table)
        head = _FloatLinear(emb.embedding_dim, emb.qweight.shape[0],
                            emb.scheme.activations if keep(emb.scheme) else "float", emb.act_scale)
        head.weight = table.weight
        setattr(model, family.HEAD, head)
        codes[f"{family.TABLE}.weight"] = (emb.qweight, emb.scale, emb.scheme, emb.zero)
    return codes


def release_weights(model) -> None:
    """Empty every parameter and buffer of a model whose format now holds its own copy of them (a
    backend's model is its only reference: see pipeline.convert), so the eager float weights do
    not sit in memory through the format's later stages. The model cannot run afterwards."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = torch.empty(0, dtype=t.dtype)
