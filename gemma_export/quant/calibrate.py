"""Calibration: running real text through the model to learn what quantization should preserve.

Input statistics of the linears (Hessians for GPTQ and the scale search, activation ranges for
static schemes), collected layer by layer on inputs that went through the already-quantized
layers, and SmoothQuant's folding of activation outliers into the weights. The calibration
corpus itself lives in the `calibration` package.
"""

from __future__ import annotations

import contextlib

import torch

import calibration as corpus

from ..errors import ConfigError
from ..gemma3 import family
from ..session import TorchSession, feed
from .modules import DequantizedLinear, QLinear
from .recipes import QuantRecipe


def calibration_set(recipe: QuantRecipe, tokenizer, max_context: int) -> tuple[list[list[int]], str]:
    """The recipe's calibration samples from the bundled corpus, and their sha256."""
    c = recipe.calibration
    # a sample never runs past the model's context (tiny test models have short ones)
    return corpus.build(tokenizer, c.samples, min(c.seq_len, max_context), c.seed)


def _observe_inputs(model, names: list[str], calibration: list[list[int]], prefill_len: int, observe) -> None:
    """Run the calibration tokens through the model, calling observe(name, x) with each named
    module's input x flattened to [tokens, features]."""
    modules = dict(model.named_modules())

    def hook(name):
        def fn(mod, args):
            observe(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        # the output head runs only when its own input is observed (it is most of a small model's cost)
        session = TorchSession(model, prefill_len=prefill_len, head=family.HEAD in names)
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
        seen = set()

        def hook(name):
            def fn(mod, args):
                acc.add(name, args[0])
                seen.add(name)
                if len(seen) == len(modules):
                    raise _Stop  # the rest of the layer (the MLP's last product, at the end) is not needed
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        try:
            for x in self.xs:
                seen.clear()
                try:
                    layer(x, *self.args[self.layer])
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        return acc.result()

    @torch.no_grad()
    def advance(self) -> None:
        """Run the current (now quantized) layer on the stored inputs: the next layer's inputs."""
        layer, args = self.model.layers[self.layer], self.args[self.layer]
        with _dequantized_once(layer):
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


@contextlib.contextmanager
def _dequantized_once(layer):
    """The layer's QLinears dequantized once for all the samples, not once per sample."""
    swapped = [(name, m) for name, m in layer.named_modules() if isinstance(m, QLinear)]
    for name, m in swapped:
        layer.set_submodule(name, DequantizedLinear(m))
    try:
        yield
    finally:
        for name, m in swapped:
            layer.set_submodule(name, m)


class _HessianSum:
    """2/N sum of x x^T of each module's inputs. Modules fed the same tensor right after another
    (q/k/v, gate/up) share that module's sum. float32, accumulated one sample at a time as GPTQ's
    reference does: float64 products took twice the time (the MLP's down projection dominates a
    layer's calibration), and the calibrated quality did not depend on it (README)."""

    def __init__(self, modules: dict):
        self.h = {n: torch.zeros(m.in_features, m.in_features) for n, m in modules.items()}
        self.count = dict.fromkeys(modules, 0)
        self.shares: dict[str, str] = {}  # module -> the module whose sum it shares
        self._last: tuple[torch.Tensor, str] | None = None

    def add(self, name: str, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        same = self._last is not None and self._last[0] is x
        if same and self.shares.setdefault(name, self._last[1]) == self._last[1] and self.count[name] == \
                self.count[self._last[1]] - rows.shape[0]:
            self.count[name] += rows.shape[0]
            return
        if same or name in self.shares:
            raise ValueError(f"{name} shares its input with a different module from one sample to the next")
        _add_gram(self.h[name], rows.float())
        self.count[name] += rows.shape[0]
        self._last = (x, name)

    def result(self) -> dict[str, torch.Tensor]:
        return {n: 2.0 * _symmetric(self.h[self.shares.get(n, n)]) / max(self.count[n], 1) for n in self.h}


GRAM_BLOCK = 1728  # wide inputs (the MLP's down projection) are summed block by block, upper half only


def _add_gram(h: torch.Tensor, rows: torch.Tensor) -> None:
    """h += rows^T rows; for wide inputs only the blocks on and above the diagonal (a third less
    work at 4 blocks), completed by `_symmetric`."""
    d = rows.shape[1]
    if d <= 2 * GRAM_BLOCK:
        h.addmm_(rows.T, rows)
        return
    cols = rows.T.contiguous()
    edges = [*range(0, d, GRAM_BLOCK), d]
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        for c, e in zip(edges[i:], edges[i + 1:]):
            h[a:b, c:e].addmm_(cols[a:b], rows[:, c:e])


def _symmetric(h: torch.Tensor) -> torch.Tensor:
    if h.shape[0] <= 2 * GRAM_BLOCK:
        return h
    upper = h.triu()
    return upper + upper.T - torch.diag(upper.diagonal())


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
    readers = {f"layers.{i}.{group[0]}": [model.get_submodule(f"layers.{i}.{n}") for n in group]
               for i in range(len(model.layers)) for group in family.INPUT_GROUPS}
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
