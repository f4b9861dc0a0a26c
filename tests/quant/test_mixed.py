"""Budgeted mixed recipes: the sensitivity estimate against measured KL, and how the budget is spent."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from gemma_export.errors import ConfigError
from gemma_export.quant import mixed
from gemma_export.quant.algorithms import dequantize, quantize_with, rtn_scales
from gemma_export.quant.quantize import quantize_, quantize_model
from gemma_export.quant.recipes import PRESETS, Mix, QuantRecipe, Scheme, resolve
from gemma_export.api import DEFAULT_TEXT
from gemma_export.artifact import read_manifest
from helpers import TINY, logits

MIXED = PRESETS["int4-mixed"]
NAMES = ["embed_tokens", "layers.0.self_attn.o_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.q_proj"]


def _calib(n=4, length=48):
    return [np.random.default_rng(i).integers(3, 262_144, size=length).tolist() for i in range(n)]


def _log_probs(model, samples):
    with torch.no_grad():
        return torch.cat([model.step(torch.tensor([ids]), torch.tensor([0]), torch.tensor([len(ids)]),
                                     model.new_cache())[0][0].log_softmax(-1) for ids in samples])


def test_estimate_matches_the_measured_kl_of_rounding_one_tensor(tiny):
    calib = _calib()
    estimates = mixed.losses(tiny, calib, {n: (MIXED.scheme_for(n),) for n in NAMES})
    assert all(p.grad is None and not p.requires_grad for p in tiny.parameters())  # left as found
    ref = _log_probs(tiny, calib)
    for name in NAMES:
        (est,) = estimates[name]
        m = copy.deepcopy(tiny)
        w = mixed._weights(m)[name]
        s = rtn_scales(w.detach(), 4, 32)
        with torch.no_grad():
            w.copy_(dequantize(quantize_with(w.detach(), s, 4), s))
        got = _log_probs(m, calib)
        kl = float((ref.exp() * (ref - got)).sum(-1).mean())
        assert 0.7 < est / kl < 1.4, (name, est, kl)


def _half_the_linears(model):
    """A budget with room for about half the linears at int8, not for the table."""
    weights = mixed._weights(model)
    linear = sum(w.numel() for n, w in weights.items() if n != "embed_tokens")
    total = sum(p.numel() for p in model.parameters())
    return round(_bytes(model, replace(MIXED, mix=None)) + 0.5 * linear * (1.0 - 0.5625) / total, 5)


def _bytes(model, recipe):
    weights = mixed._weights(model)
    total = sum(p.numel() for p in model.parameters())
    spent = sum(mixed.scheme_bytes(recipe.scheme_for(n), tuple(w.shape)) for n, w in weights.items())
    return (spent + 4.0 * (total - sum(w.numel() for w in weights.values()))) / total


def test_budget_buys_the_largest_savings_per_byte_and_is_never_exceeded(tiny):
    recipe = replace(MIXED, mix=replace(MIXED.mix, budget=_half_the_linears(tiny), samples=2))
    out, report = mixed.concrete(recipe, tiny, _calib(2))
    assert out.mix is None and all("*" not in r.pattern for r in out.rules)
    assert 0 < len(report["upgraded"]) < 14 and "embed_tokens" not in report["upgraded"]
    spent = _bytes(tiny, out)
    assert spent == pytest.approx(report["bytes_per_parameter"]) and spent <= recipe.mix.budget
    rows = report["tensors"]
    room = (recipe.mix.budget - spent) * sum(p.numel() for p in tiny.parameters())
    for r in rows:  # greedy is maximal: whatever was left out saves nothing or does not fit
        w = mixed._weights(tiny)[r["module"]]
        extra = mixed.scheme_bytes(recipe.mix.upgrade, tuple(w.shape)) - mixed.scheme_bytes(
            MIXED.scheme_for(r["module"]), tuple(w.shape))
        assert r["upgraded"] or r["upgrade_loss"] >= r["base_loss"] or extra > room
    gains = [(r["base_loss"] - r["upgrade_loss"]) / r["params"] for r in rows]
    assert gains == sorted(gains, reverse=True)  # same-width upgrades: per byte is per parameter
    assert all(out.scheme_for(n).bits == 8 for n in report["upgraded"])


def test_a_budget_below_the_base_schemes_is_refused(tiny):
    recipe = replace(MIXED, mix=replace(MIXED.mix, budget=0.3))
    with pytest.raises(ConfigError, match=r"budget 0.3 bytes per parameter is below its base schemes' 0\.5"):
        mixed.concrete(recipe, tiny, _calib(1))


def test_quantize_refuses_an_unspent_budget(tiny):
    with pytest.raises(ConfigError, match="has a byte budget"):
        quantize_(copy.deepcopy(tiny), MIXED, _calib(1))


def test_mix_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ConfigError, match="mix budget"):
        Mix(0.0, Scheme(8))
    with pytest.raises(ConfigError, match="rounding rules"):
        QuantRecipe("x", (), mix=Mix(0.6, Scheme(8)))
    f = tmp_path / "m.toml"
    f.write_text(MIXED.to_toml())
    assert resolve(str(f)) == MIXED and "[mix]" in f.read_text()


def test_quantize_model_records_the_choice(tiny):
    from gemma_export.loading import Tokenizer, load

    recipe = replace(MIXED, mix=replace(MIXED.mix, budget=_half_the_linears(tiny), samples=2),
                     calibration=replace(MIXED.calibration, samples=4, seq_len=32))
    m = copy.deepcopy(tiny)
    info = quantize_model(m, recipe, Tokenizer(load(TINY).tokenizer_path))
    d = info.to_dict()["mixed"]
    assert d["budget"] == recipe.mix.budget and d["upgraded"] and len(d["tensors"]) == 15
    assert info.recipe.mix is None and QuantRecipe.from_dict(json.loads(info.recipe.to_json())) == info.recipe
    ids = list(range(100, 140))
    ref, got = logits(tiny, ids), logits(m, ids)
    assert np.abs(ref - got).max() / np.abs(ref).max() < 0.5


@pytest.mark.slow
def test_a_mixed_tflite_holds_both_schemes_and_passes_verify(artifacts):
    fmt = "tflite"  # ai-edge-quantizer gets one config per scheme (onnx and pte lower per module anyway)
    from gemma_export.backends import get
    from gemma_export.verification.check import VerifyPlan, verify_artifact

    out = artifacts.get(fmt, "int4-mixed", debug=False)
    m = read_manifest(out)
    upgraded = m.quantization["mixed"]["upgraded"]
    assert upgraded and len(upgraded) < len(m.quantization["mixed"]["tensors"])
    stored = get(fmt).read_codes(out, m)
    widths = sorted({int(np.abs(q).max() > 8) for q in stored})  # 1: codes beyond int4's range
    assert widths == [0, 1] and len(stored) >= 15
    v = verify_artifact(out, VerifyPlan(DEFAULT_TEXT, positions=120, new_tokens=8))
    assert v.report["pass"], v.report
