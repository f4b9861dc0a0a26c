"""Size-budgeted mixed recipes: where a few extra bytes buy the most.

A recipe with a `Mix` starts every tensor at its rule's scheme (int4 block 32 for `int4-mixed`)
and spends a byte budget on the tensors whose rounding costs the model the most, as llama.cpp's
`_M` types do by hand. The cost of rounding one tensor is measured on the calibration text with
the diagonal Fisher information F (squared gradients of the loss against labels drawn from the
model's own predictions): rounding W to Q raises the mean KL against the float model by about
1/2 sum F (W - Q)^2, a second-order estimate that needs one backward pass per sample, not one
forward pass per tensor and candidate. The budget then goes to the tensors in order of loss
saved per extra byte.

`concrete(recipe, model, calibration)` returns the recipe with one exact-name rule per tensor
(what the manifest records and `verify` re-applies) and a report of the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..gemma3 import family
from .algorithms import block_for, dequantize, quantize_with, rtn_scales
from .recipes import QuantRecipe, Rule, Scheme

SCALE_BYTES = 2  # 16-bit scales, as every format stores them for int4 blocks


def scheme_bytes(scheme: Scheme | None, shape: tuple[int, int]) -> float:
    """Bytes of one [out, in] weight under a scheme (codes and 16-bit scales; float: fp32)."""
    out, inp = shape
    if scheme is None:
        return 4.0 * out * inp
    return out * inp * scheme.bits / 8 + out * (inp // block_for(scheme, inp)) * SCALE_BYTES


@dataclass(frozen=True)
class Choice:
    """One tensor's measured loss at its base scheme and at the upgrade, and what it got."""

    module: str
    params: int
    base_loss: float
    upgrade_loss: float
    extra_bytes: float
    upgraded: bool

    def to_dict(self) -> dict:
        return {"module": self.module, "params": self.params, "base_loss": self.base_loss,
                "upgrade_loss": self.upgrade_loss, "upgraded": self.upgraded}


def _weights(model) -> dict[str, torch.nn.Parameter]:
    """The quantizable weights by module name (the tied table once, as the table)."""
    out = {family.TABLE: model.embed_tokens.weight}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n != family.HEAD:
            out[n] = m.weight
    return out


def rounding_error(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """w minus its rounding to the scheme's grid (nearest, max-abs scales)."""
    block = block_for(scheme, w.shape[1])
    s = rtn_scales(w, scheme.bits, block)
    return w.float() - dequantize(quantize_with(w, s, scheme.bits), s)


def losses(model, calibration: list[list[int]], candidates: dict[str, tuple[Scheme, ...]],
           progress=lambda m: None, seed: int = 0) -> dict[str, list[float]]:
    """Estimated mean KL against the float model of rounding each named weight alone, under each
    of its candidate schemes: 1/2 sum F (W - Q)^2, with F the squared gradient of each sample's
    summed loss averaged over the samples' tokens. Each gradient is squared into F in place as
    soon as backward produces it and dropped, so one weight-sized buffer is kept; the rounding
    errors are computed once at the end (computed per sample, they made the pass 2.6x slower)."""
    weights = _weights(model)
    fisher = {n: torch.zeros_like(weights[n], dtype=torch.float32) for n in candidates}

    def fold(name):
        def hook(p):
            g = p.grad.float()
            p.grad = None
            fisher[name].addcmul_(g, g)
        return hook

    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    gen = torch.Generator().manual_seed(seed)
    try:
        for n in candidates:
            weights[n].requires_grad_(True)
            handles.append(weights[n].register_post_accumulate_grad_hook(fold(n)))
        for i, ids in enumerate(calibration):
            tokens = torch.tensor([ids], dtype=torch.long)
            t = tokens.shape[1]
            if t > model.max_context:
                raise ConfigError(f"a calibration sample of {t} tokens exceeds the model's context {model.max_context}")
            logits, _ = model.step(tokens, torch.tensor([0]), torch.tensor([t]), model.new_cache())
            logits = logits[0].float()
            # labels drawn from the model's own predictions: the expected squared gradient is then
            # the Hessian of KL(float || rounded), which is what rounding a tensor costs
            with torch.no_grad():
                labels = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
            F.cross_entropy(logits, labels, reduction="sum").backward()
            del logits
            progress(f"sensitivity: sample {i + 1}/{len(calibration)}")
    finally:
        for h in handles:
            h.remove()
        for p, r in saved.items():
            p.requires_grad_(r)
            p.grad = None
    tokens = sum(len(ids) for ids in calibration)
    out = {}
    for n, schemes in candidates.items():
        w, f = weights[n].detach(), fisher.pop(n)
        out[n] = [0.5 * float((f * rounding_error(w, s).square()).sum(dtype=torch.float64)) / tokens
                  for s in schemes]
    return out


def choose(recipe: QuantRecipe, model, measured: dict[str, list[float]]) -> list[Choice]:
    """The budget spent greedily by loss saved per extra byte (a tensor that does not fit is
    passed over for smaller ones)."""
    mix = recipe.mix
    weights = _weights(model)
    total_params = sum(p.numel() for p in model.parameters())  # the tied table counted once
    quantized = {n: recipe.scheme_for(n) for n in weights}
    base = sum(scheme_bytes(quantized[n], tuple(w.shape)) for n, w in weights.items())
    base += 4.0 * (total_params - sum(w.numel() for w in weights.values()))  # norms stay fp32
    room = mix.budget * total_params - base
    if room < 0:
        raise ConfigError(f"recipe {recipe.name}: budget {mix.budget} bytes per parameter is below its base "
                          f"schemes' {base / total_params:.4f}")
    rows = []
    for n, w in weights.items():
        sc = quantized[n]
        if sc is None or n not in measured:
            continue
        shape, up = tuple(w.shape), mix.upgrade
        rows.append([n, w.numel(), *measured[n], scheme_bytes(up, shape) - scheme_bytes(sc, shape)])
    rows.sort(key=lambda r: -(r[2] - r[3]) / max(r[4], 1.0))
    out = []
    for n, params, lb, lu, extra in rows:
        take = lu < lb and extra <= room
        room -= extra if take else 0.0
        out.append(Choice(n, params, lb, lu, extra, take))
    return out


def concrete(recipe: QuantRecipe, model, calibration: list[list[int]], progress=lambda m: None):
    """(the recipe with one rule per quantized tensor and no mix, the report for the manifest)."""
    mix = recipe.mix
    if mix is None:
        return recipe, None
    names = [n for n in _weights(model) if recipe.scheme_for(n) is not None]
    samples = calibration[:mix.samples]
    progress(f"measuring the sensitivity of {len(names)} tensors on {len(samples)} calibration samples")
    measured = losses(model, samples, {n: (recipe.scheme_for(n), mix.upgrade) for n in names}, progress)
    choices = choose(recipe, model, measured)
    by_name = {c.module: c for c in choices}
    rules = tuple(Rule(n, mix.upgrade if by_name[n].upgraded else recipe.scheme_for(n)) for n in names)
    weights = _weights(model)
    total_params = sum(p.numel() for p in model.parameters())
    spent = sum(scheme_bytes(r.scheme, tuple(weights[r.pattern].shape)) for r in rules)
    spent += 4.0 * (total_params - sum(weights[n].numel() for n in names))
    upgraded = [c.module for c in choices if c.upgraded]
    progress(f"budget {mix.budget} bytes/parameter: {len(upgraded)} of {len(names)} tensors in "
             f"{mix.upgrade.label}, {spent / total_params:.4f} bytes/parameter")
    report = {"budget": mix.budget, "bytes_per_parameter": spent / total_params, "upgrade": mix.upgrade.label,
              "samples": len(samples), "upgraded": upgraded,
              "tensors": [c.to_dict() for c in choices]}
    return replace(recipe, rules=rules, mix=None), report
