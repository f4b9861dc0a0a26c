"""Recipes as data, and quantization in PyTorch (codes, scales, RTN vs GPTQ) on the tiny model."""

import copy

import numpy as np
import pytest
import torch

from gemma_export.errors import ConfigError
from gemma_export.quantize import QEmbedding, QLinear, dequantize, gptq, qrange, quantize_, rtn_scales
from gemma_export.recipes import PRESETS, QuantRecipe, Rule, Scheme, resolve
from gemma_export.session import TorchSession, feed


def test_presets_exist():
    assert {"fp32", "int8", "int8-weights", "int4-b32", "int4-b128", "int4-b32-rtn", "int4-b128-rtn"} <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_recipe_round_trips_json_and_toml(name, tmp_path):
    r = PRESETS[name]
    assert QuantRecipe.from_dict(r.to_dict()) == r
    f = tmp_path / "r.toml"
    f.write_text(r.to_toml())
    assert resolve(str(f)) == r


def test_first_matching_rule_wins():
    r = QuantRecipe("x", (Rule("layers.0.*", None), Rule("layers.*", Scheme(4, "block", 32))))
    assert r.scheme_for("layers.0.mlp.up_proj") is None
    assert r.scheme_for("layers.1.mlp.up_proj").bits == 4
    assert r.scheme_for("norm") is None


def test_bad_schemes_and_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="bits"):
        Scheme(bits=3)
    with pytest.raises(ConfigError, match="block size"):
        Scheme(bits=4, granularity="block", block_size=48)
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(str(bad))
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve("int3")


def test_rtn_codes_are_in_range_and_zero_rows_get_a_nonzero_scale():
    w = torch.randn(8, 64)
    w[3] = 0.0
    s = rtn_scales(w, 4, 32)
    assert (s > 0).all()
    assert torch.equal(s, s.to(torch.bfloat16).float())  # bf16-representable
    from gemma_export.quantize import quantize_with

    q = quantize_with(w, s, 4)
    lo, hi = qrange(4)
    assert q.dtype == torch.int8 and q.min() >= lo and q.max() <= hi
    assert (dequantize(q, s) - w).abs().max() <= s.max() * 0.51


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_its_objective(act_order):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated inputs
    x = x * torch.rand(128, generator=g) * 4  # columns of different size (what act-order sorts by)
    h = 2 * x.T.double() @ x.double() / len(x)
    q, s = gptq(w, h, 4, 32, act_order=act_order)
    from gemma_export.quantize import quantize_with

    rtn = dequantize(quantize_with(w, s, 4), s)
    err_gptq = ((x @ (dequantize(q, s) - w).T) ** 2).mean()
    err_rtn = ((x @ (rtn - w).T) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_scale_search_lowers_the_weighted_rounding_error_per_block():
    from gemma_export.quantize import quantize_with, search_scales

    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g) * torch.rand(64, 1, generator=g)
    imp = torch.rand(128, generator=g) ** 4  # a few columns matter much more than the rest

    def block_err(s):
        e = (dequantize(quantize_with(w, s, 4), s) - w) ** 2 * imp
        return e.reshape(64, 4, 32).sum(-1)

    rtn, found = rtn_scales(w, 4, 32), search_scales(w, 4, 32, importance=imp)
    assert torch.equal(found, found.to(torch.bfloat16).float())
    assert (block_err(found) <= block_err(rtn) + 1e-12).all()  # max-abs (ratio 1) is a candidate
    assert block_err(found).sum() < 0.85 * block_err(rtn).sum()
    # the weighting matters: searching without it does worse on the weighted objective
    assert block_err(found).sum() < block_err(search_scales(w, 4, 32)).sum()


def test_packed_gather_reads_xnnpack_layout_and_equals_the_plain_gather():
    from gemma_export.quantize import pack_nibbles, quantize_with, unpack_nibbles_float

    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert int(packed[0, 0]) == (-8 + 8) | ((-7 + 8) << 4)  # even column low nibble, offset by 8
    assert torch.equal(unpack_nibbles_float(packed.float()), q.float())
    w = torch.randn(50, 64)
    s = rtn_scales(w, 4, 32)
    emb = QEmbedding(quantize_with(w, s, 4), s, Scheme(4, "block", 32))
    ids = torch.tensor([[0, 7, 49, 7]])
    plain = emb(ids)
    emb.pack_for_gather()
    assert torch.equal(emb(ids), plain)


@pytest.mark.parametrize("name", ["int8", "int4-b32-rtn", "int4-b32"])
def test_quantize_replaces_layers_and_stays_close(tiny, name):
    m = copy.deepcopy(tiny)
    calib = [np.random.default_rng(i).integers(3, 262_144, size=32).tolist() for i in range(4)]
    done = quantize_(m, PRESETS[name], calib)
    assert isinstance(m.layers[0].mlp.down_proj, QLinear) and isinstance(m.embed_tokens, QEmbedding)
    assert len(done) == 2 * 7 + 1
    ids = list(range(100, 160))
    ref = np.concatenate([lg for _, lg in feed(TorchSession(tiny, prefill_len=16), ids)])
    got = np.concatenate([lg for _, lg in feed(TorchSession(m, prefill_len=16), ids)])
    rel = np.abs(ref - got).max() / np.abs(ref).max()
    assert rel < (0.05 if name == "int8" else 0.5)


def test_layer_walk_reproduces_the_forward_pass(tiny):
    """GPTQ's sequential calibration runs the decoder one layer at a time on stored inputs: walked
    through every layer, each sample must arrive where the whole forward pass puts it."""
    from gemma_export.quantize import LayerInputs

    calib = [np.random.default_rng(i).integers(3, 262_144, size=24).tolist() for i in range(3)]
    walk = LayerInputs(tiny, calib)
    assert len(walk.xs) == 3
    for _ in tiny.layers:
        walk.advance()
    session = TorchSession(tiny, prefill_len=24)
    for x, ids in zip(walk.xs, calib):
        torch.testing.assert_close(x[0], torch.from_numpy(session.hidden_states(ids)[-1]), rtol=1e-5, atol=1e-5)
    assert walk.head_hessian().shape == (tiny.cfg.hidden_size,) * 2
    with pytest.raises(Exception, match="one length"):
        LayerInputs(tiny, [calib[0], calib[1][:10]])


def test_embedding_codes_are_shared_with_the_head(tiny):
    m = copy.deepcopy(tiny)
    quantize_(m, PRESETS["int4-b32-rtn"])
    names = [n for n, _ in m.named_buffers() if "qweight" in n and "embed" in n]
    assert names == ["embed_tokens.qweight"]  # stored once, the head reads the same buffer


def _logits(model, ids):
    return np.concatenate([lg for _, lg in feed(TorchSession(model, prefill_len=16), ids)])


def test_smoothing_keeps_the_function_and_flattens_activation_outliers(tiny):
    from gemma_export.quantize import collect_absmax, smooth_

    m = copy.deepcopy(tiny)
    with torch.no_grad():  # plant an outlier channel in the q/k/v input and in the down_proj input
        m.layers[0].input_layernorm.weight[3] = 40.0
        m.layers[1].mlp.up_proj.weight[5] *= 30.0
    calib = [np.random.default_rng(i).integers(3, 262_144, size=32).tolist() for i in range(4)]
    names = ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    spread = lambda a: float(a.max() / a.median())  # noqa: E731
    before = {n: spread(a) for n, a in collect_absmax(m, names, calib, 32).items()}
    ids = list(range(100, 160))
    ref = _logits(m, ids)
    assert smooth_(m, calib, alpha=0.5) == 4 * 2
    after = {n: spread(a) for n, a in collect_absmax(m, names, calib, 32).items()}
    got = _logits(m, ids)
    assert np.abs(ref - got).max() / np.abs(ref).max() < 1e-4  # same function
    for n in names:
        assert after[n] < 0.5 * before[n], (n, before[n], after[n])


def test_static_activation_schemes_calibrate_a_scale_and_need_data(tiny):
    rules = (Rule("embed_tokens", Scheme(8, activations="int16-static")),
             Rule("layers.*", Scheme(8, activations="int8-static")))
    recipe = QuantRecipe("static", rules)
    assert recipe.needs_calibration
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_(copy.deepcopy(tiny), recipe)
    m = copy.deepcopy(tiny)
    calib = [np.random.default_rng(i).integers(3, 262_144, size=32).tolist() for i in range(4)]
    quantize_(m, recipe, calib)
    scales = [float(mod.act_scale) for mod in m.modules() if isinstance(mod, (QLinear, QEmbedding))]
    assert len(scales) == 15 and all(s > 0 for s in scales)
    ids = list(range(100, 160))
    ref, got = _logits(tiny, ids), _logits(m, ids)
    rel = np.abs(ref - got).max() / np.abs(ref).max()
    assert 0 < rel < 0.1


def test_smoothing_round_trips_and_is_validated(tmp_path):
    r = QuantRecipe("s", (Rule("layers.*", Scheme(8, activations="int8-dynamic")),), smoothing=0.5)
    assert r.needs_calibration
    path = tmp_path / "s.toml"
    path.write_text(r.to_toml())
    assert resolve(str(path)) == r
    with pytest.raises(ConfigError, match="smoothing"):
        QuantRecipe("bad", smoothing=1.5)
