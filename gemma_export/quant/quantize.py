"""Quantization done once, in PyTorch: integer codes and scales that every backend lowers as-is.

`quantize_(model, recipe, calibration_ids)` replaces matched linear layers (and the tied embedding
table) with modules that hold the codes and scales (`quant.modules`); `quantize_model` does the
same with the recipe's calibration set drawn from the bundled corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..gemma3 import family
from .algorithms import qrange, quantize_weight
from .calibrate import LayerInputs, calibration_set, collect_absmax, smooth_
from .modules import QEmbedding, QLinear, TiedQHead
from . import mixed, source
from .recipes import QuantRecipe, Scheme, resolve


@dataclass(frozen=True)
class QuantInfo:
    """What a quantization did, as the manifest records it."""

    recipe: QuantRecipe
    calibration_sha256: str | None
    quantized_modules: int
    source: dict | None = None  # source recipes: the checkpoint, its types -> schemes, values not kept
    mixed: dict | None = None  # budgeted recipes: the budget, what was measured and what it bought

    def to_dict(self) -> dict:
        d = {"calibration_sha256": self.calibration_sha256, "quantized_modules": self.quantized_modules,
             "thresholds": self.recipe.thresholds.to_dict()}
        if self.source:
            d["source"] = self.source
        if self.mixed:
            d["mixed"] = self.mixed
        return d


def quantize_model(model, recipe_ref, tokenizer, progress=lambda m: None, checkpoint=None) -> QuantInfo:
    """Quantize in place with a recipe (preset, file or QuantRecipe), calibrating on the bundled corpus.
    `checkpoint`: the GGUF file or safetensors folder the weights came from (its codes: `source` recipes)."""
    recipe = resolve(recipe_ref)
    data, digest, codes = None, None, None
    if recipe.uses_source:
        types = source.tensor_types(checkpoint)
        if not any(t in source.KINDS for t in types.values()):
            raise ConfigError(f"recipe {recipe.name} keeps a checkpoint's codes, and these weights hold none "
                              "(random weights, or neither a GGUF of block types nor weights on a Q4_0 grid)")
        recipe = source.concrete(recipe, types, source.modules(model.cfg))
        keep = [r.pattern for r in recipe.rules if r.scheme is not None and r.scheme.algorithm == "source"]
        progress(f"reading the codes of {len(keep)} tensors from {checkpoint.name}")
        codes = source.read_codes(checkpoint, keep)
        kept = {"checkpoint": checkpoint.name, "types": source.summary(recipe, types),
                "values_not_kept": sum(source.values_not_kept(c, recipe.scheme_for(n)) for n, c in codes.items())}
    if recipe.needs_calibration:
        data, digest = calibration_set(recipe, tokenizer, model.max_context)
    recipe, spent = mixed.concrete(recipe, model, data, progress)
    return QuantInfo(recipe, digest, len(quantize_(model, recipe, data, progress, codes)),
                     kept if recipe.uses_source else None, spent)


@dataclass(frozen=True)
class _Plan:
    """Which modules a recipe quantizes, and which of them need calibration statistics."""

    linears: dict  # module name -> Scheme
    table: Scheme | None  # the tied token table's scheme
    hessians: frozenset  # module names (the head stands for the table) whose inputs' Hessians are needed
    ranges: frozenset  # module names whose static activation ranges are needed


def _plan(model, recipe: QuantRecipe) -> _Plan:
    linears = {n: recipe.scheme_for(n) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n != family.HEAD}
    linears = {n: s for n, s in linears.items() if s is not None}
    table = recipe.scheme_for(family.TABLE)
    schemes = {**linears, **({family.HEAD: table} if table is not None else {})}
    # the tied table is calibrated as the head: by its input's Hessian and range
    return _Plan(linears, table, frozenset(n for n, s in schemes.items() if s.algorithm not in ("rtn", "source")),
                 frozenset(n for n, s in schemes.items() if s.activations.endswith("static")))


def quantize_(model, recipe: QuantRecipe, calibration: list[list[int]] | None = None, progress=lambda m: None,
              codes: dict | None = None):
    """Quantize `model` in place following `recipe`; returns {module name: scheme label}.
    `codes`: {module name: source.SourceCodes} for the modules whose scheme keeps a source's codes."""
    if recipe.is_float:
        return {}
    if recipe.mix is not None:
        raise ConfigError(f"recipe {recipe.name} has a byte budget: quantize_model (or quant.mixed.concrete) "
                          "spends it first")
    plan = _plan(model, recipe)
    if recipe.needs_calibration and not calibration:
        raise ConfigError(f"recipe {recipe.name} needs calibration data")
    if recipe.smoothing:
        smooth_(model, calibration, recipe.smoothing, progress)
    ranges = {}
    if plan.ranges:
        progress(f"calibrating activation ranges of {len(plan.ranges)} linear layers")
        absmax = collect_absmax(model, sorted(plan.ranges), calibration, max(len(c) for c in calibration))
        ranges = {n: float(a.max()) for n, a in absmax.items()}
    walk = None
    if plan.hessians:
        progress(f"calibrating: {len(calibration)} samples through the decoder layer by layer "
                 f"({len(plan.hessians)} layers need Hessians)")
        walk = LayerInputs(model, calibration)
    codes = codes or {}
    missing = [n for n, sc in {**plan.linears, family.TABLE: plan.table}.items()
               if sc is not None and sc.algorithm == "source" and n not in codes]
    if missing:
        raise ConfigError(f"recipe {recipe.name}: no source codes for {missing[0]}")
    done = _quantize_linears(model, plan, walk, ranges, progress, codes)
    if plan.table is not None:
        head_hessian = None
        if walk is not None and family.HEAD in plan.hessians:
            while walk.layer < len(model.layers):
                walk.advance()
            head_hessian = walk.head_hessian()
        del walk
        done[family.TABLE] = _quantize_table(model, plan.table, head_hessian, ranges.get(family.HEAD), progress,
                                             codes.get(family.TABLE))
    return done


def _quantize_linears(model, plan: _Plan, walk: LayerInputs | None, ranges: dict, progress, codes: dict) -> dict:
    """Replace each planned linear by a QLinear, decoder layer by decoder layer (calibrated layers
    see inputs that went through the already-quantized layers before them)."""
    done, by_layer = {}, {}
    for name in plan.linears:
        by_layer.setdefault(family.layer_of(name), []).append(name)
    for i in sorted(by_layer, key=lambda k: (k is None, k)):
        needed = [n for n in by_layer[i] if n in plan.hessians]
        if needed and (walk is None or i is None):
            raise ConfigError(f"calibrated linears outside the decoder layers: {by_layer[i]}")
        if needed:
            while walk.layer < i:
                walk.advance()
        hessians = walk.hessians(needed) if needed else {}
        for name in by_layer[i]:
            scheme = plan.linears[name]
            w = model.get_submodule(name).weight.detach()
            if scheme.algorithm == "source":
                q, s, z = _source(source.as_stored(codes[name], scheme), w, name)
            else:
                (q, s), z = quantize_weight(w, scheme, hessians.pop(name, None)), None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QLinear(q, s, scheme, _act_scale(scheme, ranges.get(name)), z))
            done[name] = scheme.label
        if i is not None:  # a line per layer: calibrated layers take a while each on the larger models
            progress(f"quantized the linears of decoder layer {i + 1}/{len(model.layers)}")
    return done


def _quantize_table(model, scheme: Scheme, hessian, amax: float | None, progress, codes=None) -> str:
    """The tied token table as one QEmbedding, read by the lookup and (through TiedQHead) the head."""
    w = model.embed_tokens.weight.detach()
    if scheme.algorithm == "source":
        q, s, z = _source(source.as_stored(codes, scheme), w, family.TABLE)
    else:
        if scheme.algorithm != "rtn":
            progress(f"calibrating the tied token table as the output head ({scheme.algorithm})")
        (q, s), z = quantize_weight(w, scheme, hessian), None
    emb = QEmbedding(q, s, scheme, z)
    emb.act_scale.fill_(_act_scale(scheme, amax))
    model.embed_tokens = emb
    model.lm_head = TiedQHead(emb)
    return scheme.label


def _source(codes, w: torch.Tensor, name: str):
    """A source tensor's (codes, scales, zero points) as tensors, checked against the loaded weight."""
    if tuple(codes.codes.shape) != tuple(w.shape):
        raise ConfigError(f"{name}: the checkpoint's codes are {tuple(codes.codes.shape)}, the weight {tuple(w.shape)}")
    zero = None if codes.zero is None else torch.from_numpy(codes.zero)
    return torch.from_numpy(codes.codes), torch.from_numpy(codes.scale), zero


def _act_scale(scheme: Scheme, amax: float | None) -> float:
    """Per-tensor static activation scale from a calibrated range (0 when not static)."""
    if amax is None:
        return 0.0
    bits = 16 if scheme.activations == "int16-static" else 8
    return max(amax, 1e-6) / qrange(bits)[1]


@torch.no_grad()
def quantized_state(model) -> dict:
    """{module name: (codes, scales, scheme)} of every quantized module (the codes a backend must store)."""
    return {n: (m.qweight, m.scale, m.scheme) for n, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))}
