"""quantize_: which modules a recipe replaces, with what, and how close the result stays."""

import copy

import numpy as np
import pytest

from gemma_export.errors import ConfigError
from gemma_export.quant.modules import QEmbedding, QLinear
from gemma_export.quant.quantize import quantize_, quantized_state
from gemma_export.quant.recipes import PRESETS, QuantRecipe, Rule, Scheme
from helpers import logits


def _calib():
    return [np.random.default_rng(i).integers(3, 262_144, size=32).tolist() for i in range(4)]


@pytest.mark.parametrize("name", ["int8", "int4-b32-rtn", "int4-b32"])
def test_quantize_replaces_layers_and_stays_close(tiny, name):
    m = copy.deepcopy(tiny)
    done = quantize_(m, PRESETS[name], _calib())
    assert isinstance(m.layers[0].mlp.down_proj, QLinear) and isinstance(m.embed_tokens, QEmbedding)
    assert len(done) == 2 * 7 + 1 == len(quantized_state(m))
    ids = list(range(100, 160))
    ref, got = logits(tiny, ids), logits(m, ids)
    rel = np.abs(ref - got).max() / np.abs(ref).max()
    assert rel < (0.05 if name == "int8" else 0.5)


def test_embedding_codes_are_shared_with_the_head(tiny):
    m = copy.deepcopy(tiny)
    quantize_(m, PRESETS["int4-b32-rtn"])
    names = [n for n, _ in m.named_buffers() if "qweight" in n and "embed" in n]
    assert names == ["embed_tokens.qweight"]  # stored once, the head reads the same buffer


def test_rules_leave_unmatched_modules_float(tiny):
    m = copy.deepcopy(tiny)
    recipe = QuantRecipe("mlp-only", (Rule("layers.*.mlp.*", Scheme(8)),))
    done = quantize_(m, recipe)
    assert sorted(done) == [f"layers.{i}.mlp.{p}" for i in range(2) for p in ("down_proj", "gate_proj", "up_proj")]
    assert not isinstance(m.layers[0].self_attn.q_proj, QLinear) and not isinstance(m.embed_tokens, QEmbedding)


def test_static_activation_schemes_calibrate_a_scale_and_need_data(tiny):
    rules = (Rule("embed_tokens", Scheme(8, activations="int16-static")),
             Rule("layers.*", Scheme(8, activations="int8-static")))
    recipe = QuantRecipe("static", rules)
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_(copy.deepcopy(tiny), recipe)
    m = copy.deepcopy(tiny)
    quantize_(m, recipe, _calib())
    scales = [float(mod.act_scale) for mod in m.modules() if isinstance(mod, (QLinear, QEmbedding))]
    assert len(scales) == 15 and all(s > 0 for s in scales)
    ids = list(range(100, 160))
    rel = np.abs(logits(tiny, ids) - logits(m, ids)).max() / np.abs(logits(tiny, ids)).max()
    assert 0 < rel < 0.1
