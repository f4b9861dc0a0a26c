"""Quantization done once, in PyTorch: integer codes and scales that every converter lowers as-is.

`quantize_(model, recipe, calibration_ids)` replaces matched linear layers (and the tied embedding
table) with modules that hold int8 codes (4-bit codes use the range [-8, 7]) and scales. Scales
are rounded to bfloat16-representable values, so the dequantized weights are the same numbers in
every format's scale dtype (bf16 for XNNPACK, fp16/fp32 elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .recipes import QuantRecipe, Scheme

MIN_SCALE = 2.0**-14  # an all-zero row still gets a usable (non-zero, fp16-normal) scale


def _blocks(scheme: Scheme, in_features: int) -> int:
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
        for r in ratios.tolist():
            sc = (amax * r / hi).clamp_min(MIN_SCALE).to(torch.bfloat16).float()
            q = torch.clamp(torch.round(wb / sc[..., None]), lo, hi)
            err = ((wb - q * sc[..., None]) ** 2 * imp).sum(-1)
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


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int4 codes [rows, n] -> uint8 [rows, n/2]: code + 8 in the low nibble for even columns,
    in the high nibble for odd columns."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles_float(b: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles on bytes already converted to float (float ops only, so any
    runtime's portable kernels run it): [..., n/2] -> codes [..., n] as float."""
    hi = torch.floor(b / 16.0)
    lo = b - 16.0 * hi
    return torch.stack((lo, hi), dim=-1).reshape(*b.shape[:-1], 2 * b.shape[-1]) - 8.0


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(q.shape[1] // scale.shape[1], dim=1)


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
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    n = w.shape[1]
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, order], h[order][:, order]
    col_block = order // block  # each (reordered) column keeps its original block's scale
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    lo, hi = qrange(bits)
    q = torch.zeros_like(w, dtype=torch.int8)
    for a in range(0, n, step):
        b = min(a + step, n)
        w1, err1, hinv1 = w[:, a:b].clone(), torch.zeros_like(w[:, a:b]), hinv[a:b, a:b]
        for i in range(b - a):
            col, d = w1[:, i], hinv1[i, i]
            s = scale[:, col_block[a + i]]
            qc = torch.clamp(torch.round(col / s), lo, hi)
            q[:, a + i] = qc.to(torch.int8)
            e = (col - qc * s) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, b:] -= err1 @ hinv[a:b, b:]
    out = torch.empty_like(q)
    out[:, order] = q
    return out, scale


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 activations (asymmetric per token) in plain float ops: the reference
    semantics, and exactly what the ONNX graph computes."""
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    zero = torch.round(-128.0 - lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, -128, 127)
    return (q - zero) * scale


def dynamic_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 activations (asymmetric per token) as torchao's quant primitives (ExecuTorch).

    XNNPACK recognises this choose-qparams / quantize / dequantize pattern feeding a linear layer
    and runs the layer as an int8-activation integer GEMM on the weight codes.
    """
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    # torchao wraps these two in torch.no_grad(); each of those grad toggles splits torch.export's
    # graph, which it then re-inlines piece by piece (minutes per method on the 270M). The
    # undecorated functions record the same ops without the toggles.
    choose, quantize = (getattr(f, "__wrapped__", f) for f in (choose_qparams_affine, quantize_affine))
    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    scale, zero = choose(x, MappingType.ASYMMETRIC, block, torch.int8, quant_min=-128,
                         quant_max=127, zero_point_dtype=torch.int8)
    q = quantize(x, block, scale, zero, torch.int8, quant_min=-128, quant_max=127)
    return dequantize_affine(q, block, scale, zero, torch.int8, -128, 127, output_dtype=x.dtype)


def _affine_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """codes x scales, written as torchao's dequantize_affine (the form XNNPACK lowers)."""
    from torchao.quantization.quant_primitives import dequantize_affine

    lo, hi = qrange(bits)
    return dequantize_affine(q, (1, q.shape[1] // scale.shape[1]), scale, zero, torch.int8, lo, hi,
                             output_dtype=torch.float32)


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


def _quant_linear(x, q, scale, zero, scheme: Scheme, xnnpack: bool, act_scale=None):
    """x @ (codes x scales)^T with the scheme's activation quantization, in one of two spellings."""
    if xnnpack:
        dynamic = scheme.activations == "int8-dynamic"
        return F.linear(dynamic_int8_per_token(x) if dynamic else x, _affine_weight(q, scale, zero, scheme.bits))
    return F.linear(quantize_activations(x, scheme.activations, act_scale), dequantize(q, scale).to(x.dtype))


class QLinear(nn.Module):
    """A linear layer holding integer codes and scales (no bias; Gemma has none)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, act_scale: float = 0.0):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros_like(scale, dtype=torch.int8))  # symmetric
        self.register_buffer("act_scale", torch.tensor(float(act_scale)))  # static activations only
        self.scheme = scheme
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    def weight_float(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale)

    # Set by the ExecuTorch converter: write the layer as torchao's quant pattern, which XNNPACK
    # runs as an integer GEMM (its own dynamic activation quantization, not bit-identical to ours).
    xnnpack_pattern = False

    def forward(self, x):
        return _quant_linear(x, self.qweight, self.scale, self.zero_point, self.scheme, self.xnnpack_pattern,
                             self.act_scale)


class QEmbedding(nn.Module):
    """The token table as integer codes with per-row (or per-block) scales; tied to the head."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, scheme: Scheme):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros_like(scale, dtype=torch.int8))
        self.register_buffer("act_scale", torch.tensor(0.0))  # the head's input, static schemes only
        self.scheme = scheme
        self.embedding_dim = qweight.shape[1]

    def forward(self, ids):
        codes, scale = (self.packed_codes, self.packed_scale) if self.packed else (self.qweight, self.scale)
        rows = F.embedding(ids, codes).to(torch.float32)  # gather the codes, then scale
        if self.packed and self.scheme.bits == 4:
            rows = unpack_nibbles_float(rows)
        s = F.embedding(ids, scale).to(torch.float32)
        return rows * s.repeat_interleave(self.embedding_dim // scale.shape[1], dim=-1)

    packed = False  # see pack_for_gather

    def pack_for_gather(self) -> None:
        """Gather from a compact copy laid out as XNNPACK stores the head's weights: 4-bit codes
        two per byte (pack_nibbles) with bf16 scales (exact: our scales are bf16 values), 8-bit
        codes as they are with fp32 scales."""
        self.register_buffer("packed_codes", pack_nibbles(self.qweight) if self.scheme.bits == 4 else self.qweight,
                             persistent=False)
        # XNNPACK keeps blockwise (int4) scales as bf16 and per-channel (int8) scales as fp32
        dtype = torch.bfloat16 if self.scheme.bits == 4 else torch.float32
        self.register_buffer("packed_scale", self.scale.to(dtype), persistent=False)
        self.packed = True

    @property
    def weight(self):  # the dequantized table
        return dequantize(self.qweight, self.scale)


class TiedQHead(nn.Module):
    """The output head reusing the embedding's codes and scales (stored once).

    Its input is quantized dynamically when the embedding scheme says int8-dynamic (XNNPACK only
    delegates integer weights with int8 dynamic activations).
    """

    def __init__(self, embedding: QEmbedding):
        super().__init__()
        self.embedding = [embedding]  # not a submodule: its buffers belong to the embedding

    xnnpack_pattern = False  # see QLinear

    def forward(self, x):
        e = self.embedding[0]
        return _quant_linear(x, e.qweight, e.scale, e.zero_point, e.scheme, self.xnnpack_pattern, e.act_scale)


def _observe_inputs(model, names: list[str], calibration: list[list[int]], prefill_len: int, observe) -> None:
    """Run the calibration tokens through the model, calling observe(name, x) with each named
    module's input x flattened to [tokens, features]."""
    from .session import TorchSession, feed

    modules = dict(model.named_modules())

    def hook(name):
        def fn(mod, args):
            observe(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        session = TorchSession(model, prefill_len=prefill_len)
        for ids in calibration:
            session.reset()
            for _ in feed(session, ids, schedule=[len(ids)] if len(ids) <= prefill_len else None):
                pass
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    pass


class LayerInputs:
    """The calibration samples walked through the decoder one layer at a time (GPTQ's sequential
    mode): each layer's Hessians come from inputs that went through the layers before it as
    already quantized, so its rounding also absorbs what they lost.

    The residual stream entering layer 0 is captured once per sample; each layer then runs on the
    stored stream (the other layer arguments, rope tables, masks and empty caches, are the same for
    every sample of one length) and its output becomes the next layer's input.
    """

    @torch.no_grad()
    def __init__(self, model, calibration: list[list[int]]):
        from .session import TorchSession

        if len({len(c) for c in calibration}) != 1:
            raise ConfigError("sequential calibration needs samples of one length")
        self.model, n = model, len(calibration[0])
        self.args: list[tuple | None] = [None] * len(model.layers)
        self.xs: list[torch.Tensor] = []

        def capture(i):
            def fn(mod, args):
                if self.args[i] is None:
                    self.args[i] = args[1:]
                if i == 0:
                    self.xs.append(args[0].detach().clone())
                    if all(a is not None for a in self.args):
                        raise _Stop  # every layer's arguments are known: only layer 0's input is needed
            return fn

        handles = [layer.register_forward_pre_hook(capture(i)) for i, layer in enumerate(model.layers)]
        try:
            session = TorchSession(model, prefill_len=n)
            for ids in calibration:
                session.reset()
                try:
                    session.prefill(ids, 0)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        self.layer = 0

    @torch.no_grad()
    def hessians(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Hessians of the named linears of the current layer (`layers.{i}.` names)."""
        layer = self.model.layers[self.layer]
        prefix = f"layers.{self.layer}."
        modules = {n: self.model.get_submodule(n) for n in names}
        if not all(n.startswith(prefix) for n in names):
            raise ValueError(f"not all of {names} are in {prefix}")
        acc = _HessianSum(modules)
        handles = [m.register_forward_pre_hook(acc.hook(n)) for n, m in modules.items()]
        try:
            for x in self.xs:
                layer(x, *self.args[self.layer])
        finally:
            for h in handles:
                h.remove()
        return acc.result()

    @torch.no_grad()
    def advance(self) -> None:
        """Run the current (now quantized) layer on the stored inputs: the next layer's inputs."""
        layer, args = self.model.layers[self.layer], self.args[self.layer]
        self.xs = [layer(x, *args)[0] for x in self.xs]
        self.layer += 1

    @torch.no_grad()
    def head_hessian(self) -> torch.Tensor:
        """Hessian of the output head's input (the final norm of the last layer's output)."""
        if self.layer != len(self.model.layers):
            raise ValueError("the head's inputs exist once every layer has advanced")
        acc = _HessianSum({"lm_head": self.model.lm_head})
        for x in self.xs:
            acc.add("lm_head", self.model.norm(x))
        return acc.result()["lm_head"]


class _HessianSum:
    """2/N sum of x x^T of each module's inputs (float64). Modules fed the same tensor one after
    the other (q/k/v, gate/up) share one product."""

    def __init__(self, modules: dict):
        self.h = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in modules.items()}
        self.count = dict.fromkeys(modules, 0)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, name: str, x: torch.Tensor) -> None:
        if self._last is None or self._last[0] is not x:
            xd = x.detach().reshape(-1, x.shape[-1]).double()
            self._last = (x, xd.T @ xd)
        self.h[name] += self._last[1]
        self.count[name] += x.reshape(-1, x.shape[-1]).shape[0]

    def hook(self, name: str):
        return lambda mod, args: self.add(name, args[0])

    def result(self) -> dict[str, torch.Tensor]:
        return {n: 2.0 * h / max(self.count[n], 1) for n, h in self.h.items()}


def collect_absmax(model, names: list[str], calibration: list[list[int]], prefill_len: int = 128):
    """Per-input-channel max |x| of each named linear's inputs over the calibration tokens."""
    modules = dict(model.named_modules())
    amax = {n: torch.zeros(modules[n].in_features) for n in names}

    def observe(name, x):
        torch.maximum(amax[name], x.abs().amax(0).float(), out=amax[name])

    _observe_inputs(model, names, calibration, prefill_len, observe)
    return amax


@torch.no_grad()
def smooth_(model, calibration: list[list[int]], alpha: float, progress=lambda m: None) -> int:
    """Move activation outliers into the weights before quantizing (SmoothQuant, Xiao et al. 2022).

    For each group of linears reading the same input, input channel j is divided by
    s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) and the weights' column j multiplied by it, so
    the float model computes the same function while per-token int8 activations see flatter rows.
    The division is folded into what produces the input: the RMSNorm scale (1 + w) before q/k/v and
    gate/up, the up projection before down, the value projection before the output projection
    (one factor per KV-head channel, shared by the query heads of the group).
    """
    cfg = model.cfg
    readers = {}
    for i, layer in enumerate(model.layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        readers[f"{a}.q_proj"] = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        readers[f"{m}.gate_proj"] = [layer.mlp.gate_proj, layer.mlp.up_proj]
        readers[f"{m}.down_proj"] = [layer.mlp.down_proj]
        readers[f"{a}.o_proj"] = [layer.self_attn.o_proj]
    progress(f"smoothing (alpha {alpha}): activation ranges of {len(readers)} linear inputs")
    amax = collect_absmax(model, list(readers), calibration, prefill_len=max(len(c) for c in calibration))
    rep, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim

    def factors(name, tie=None):
        wmax = torch.stack([lin.weight.abs().amax(0) for lin in readers[name]]).amax(0)
        xmax = amax[name]
        if tie == "kv":  # [H*d] -> max over the query heads of each KV head -> [kv*d]
            xmax = xmax.view(cfg.num_kv_heads, rep, d).amax(1).reshape(-1)
            wmax = wmax.view(cfg.num_kv_heads, rep, d).amax(1).reshape(-1)
        s = xmax.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
        return s.clamp(1e-2, 1e2)

    for i, layer in enumerate(model.layers):
        att, mlp = layer.self_attn, layer.mlp
        for norm, name in ((layer.input_layernorm, f"layers.{i}.self_attn.q_proj"),
                           (layer.pre_feedforward_layernorm, f"layers.{i}.mlp.gate_proj")):
            s = factors(name)
            norm.weight.copy_((1 + norm.weight) / s - 1)
            for lin in readers[name]:
                lin.weight.mul_(s)
        s = factors(f"layers.{i}.mlp.down_proj")
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s)
        s = factors(f"layers.{i}.self_attn.o_proj", tie="kv")
        att.v_proj.weight.div_(s[:, None])
        att.o_proj.weight.mul_(s.view(cfg.num_kv_heads, 1, d).expand(-1, rep, -1).reshape(-1))
    return len(readers)


def quantize_(model, recipe: QuantRecipe, calibration: list[list[int]] | None = None, progress=lambda m: None):
    """Quantize `model` in place following `recipe`; returns {module name: scheme label}."""
    if recipe.is_float:
        return {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    plan = {n: recipe.scheme_for(n) for n in linears}
    plan = {n: s for n, s in plan.items() if s is not None}
    calibrated = [n for n, s in plan.items() if s.algorithm != "rtn"]  # need their inputs' Hessians
    emb_scheme = recipe.scheme_for("embed_tokens")
    if emb_scheme is not None and emb_scheme.algorithm != "rtn":
        calibrated.append("lm_head")  # the tied table is calibrated as the head: its input's Hessian
    static = [n for n, s in plan.items() if s.activations.endswith("static")]
    if emb_scheme is not None and emb_scheme.activations.endswith("static"):
        static.append("lm_head")
    if recipe.needs_calibration and not calibration:
        raise ConfigError(f"recipe {recipe.name} needs calibration data")
    if recipe.smoothing:
        smooth_(model, calibration, recipe.smoothing, progress)
    ranges = {}
    if static:
        progress(f"calibrating activation ranges of {len(static)} linear layers")
        ranges = {n: float(a.max()) for n, a in collect_absmax(model, static, calibration,
                                                               max(len(c) for c in calibration)).items()}
    walk = None
    if calibrated:
        progress(f"calibrating: {len(calibration)} samples through the decoder layer by layer "
                 f"({len(calibrated)} layers need Hessians)")
        walk = LayerInputs(model, calibration)
    done = {}
    by_layer: dict[int, list[str]] = {}
    for name in plan:
        by_layer.setdefault(_layer_index(name), []).append(name)
    for i in sorted(by_layer, key=lambda k: (k is None, k)):
        if walk is not None and i is not None:
            while walk.layer < i:
                walk.advance()
            hessians = walk.hessians([n for n in by_layer[i] if n in calibrated])
        else:
            hessians = {}
            if any(n in calibrated for n in by_layer[i]):
                raise ConfigError(f"calibrated linears outside the decoder layers: {by_layer[i]}")
        for name in by_layer[i]:
            scheme, lin = plan[name], linears[name]
            q, s = _quantize_weight(lin.weight.detach(), scheme, _blocks(scheme, lin.in_features), hessians.pop(name, None))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QLinear(q, s, scheme, _act_scale(scheme, ranges.get(name))))
            done[name] = scheme.label
        if i is not None:  # a line per layer: on the 1B each takes about a minute with calibration
            progress(f"quantized the linears of decoder layer {i + 1}/{len(model.layers)}")
    head_hessian = None
    if walk is not None and "lm_head" in calibrated:
        while walk.layer < len(model.layers):
            walk.advance()
        head_hessian = walk.head_hessian()
    del walk
    if emb_scheme is not None:
        w = model.embed_tokens.weight.detach()
        block = _blocks(emb_scheme, w.shape[1])
        if emb_scheme.algorithm != "rtn":
            progress(f"calibrating the tied token table as the output head ({emb_scheme.algorithm})")
        q, s = _quantize_weight(w, emb_scheme, block, head_hessian)
        emb = QEmbedding(q, s, emb_scheme)
        emb.act_scale.fill_(_act_scale(emb_scheme, ranges.get("lm_head")))
        model.embed_tokens = emb
        model.lm_head = TiedQHead(emb)
        done["embed_tokens"] = emb_scheme.label
    return done


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def _quantize_weight(w: torch.Tensor, scheme: Scheme, block: int, hessian: torch.Tensor | None):
    """(codes, scales) of one weight matrix by the scheme's algorithm (see recipes.ALGORITHMS)."""
    if scheme.algorithm in ("gptq", "gptq-act"):
        return gptq(w, hessian, scheme.bits, block, act_order=scheme.algorithm == "gptq-act")
    if scheme.algorithm == "search":
        s = search_scales(w, scheme.bits, block, importance=torch.diag(hessian))
    else:
        s = rtn_scales(w, scheme.bits, block)
    return quantize_with(w, s, scheme.bits), s


def _act_scale(scheme: Scheme, amax: float | None) -> float:
    """Per-tensor static activation scale from a calibrated range (0 when not static)."""
    if amax is None:
        return 0.0
    bits = 16 if scheme.activations == "int16-static" else 8
    return max(amax, 1e-6) / qrange(bits)[1]


def float_twin(model, activation_ops=True) -> dict:
    """Swap quantized modules back to float modules holding exactly the dequantized weights.

    Returns {parameter name: (codes int8, scales fp32, scheme)} for the converters that trace the
    float graph and then replace each weight by its codes (ONNX, TFLite). With
    `activation_ops=False` the activation quantization is left to the runtime's kernels (TFLite's
    dynamic-range kernels quantize activations themselves); a callable decides per scheme.
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
            codes[f"{name}.weight"] = (mod.qweight, mod.scale, mod.scheme)
    emb = model.embed_tokens
    if isinstance(emb, QEmbedding):
        table = nn.Embedding(emb.qweight.shape[0], emb.embedding_dim)
        table.weight = nn.Parameter(emb.weight, requires_grad=False)
        model.embed_tokens = table
        head = _FloatLinear(emb.embedding_dim, emb.qweight.shape[0],
                            emb.scheme.activations if keep(emb.scheme) else "float", emb.act_scale)
        head.weight = table.weight
        model.lm_head = head
        codes["embed_tokens.weight"] = (emb.qweight, emb.scale, emb.scheme)
    return codes


class _FloatLinear(nn.Linear):
    """Float weights (exactly codes x scales) with the dynamic int8 activations as float ops."""

    def __init__(self, in_features: int, out_features: int, activations: str, act_scale: torch.Tensor):
        super().__init__(in_features, out_features, bias=False)
        self.activations = activations
        self.register_buffer("act_scale", act_scale.clone())

    def forward(self, x):
        return super().forward(quantize_activations(x, self.activations, self.act_scale))


def use_xnnpack_pattern(model) -> int:
    """Switch quantized layers to the torchao pattern XNNPACK lowers; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, (QLinear, TiedQHead)):
            m.xnnpack_pattern = True
            n += 1
        elif isinstance(m, QEmbedding):
            m.pack_for_gather()
    return n
