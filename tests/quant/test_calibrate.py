"""Calibration: the layer-by-layer walk reproduces the forward pass, smoothing keeps the function."""

import copy

import numpy as np
import pytest
import torch

from gemma_export.quant import calibrate
from gemma_export.quant.calibrate import LayerInputs, calibration_set, collect_absmax, smooth_
from gemma_export.quant.quantize import quantize_
from gemma_export.quant.recipes import PRESETS
from gemma_export.session import TorchSession
from helpers import logits


def _calib(n=4, length=32):
    return [np.random.default_rng(i).integers(3, 262_144, size=length).tolist() for i in range(n)]


def test_layer_walk_reproduces_the_forward_pass(tiny):
    """GPTQ's sequential calibration runs the decoder one layer at a time on stored inputs: walked
    through every layer, each sample must arrive where the whole forward pass puts it."""
    calib = _calib(3, 24)
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


def test_smoothing_keeps_the_function_and_flattens_activation_outliers(tiny):
    m = copy.deepcopy(tiny)
    with torch.no_grad():  # plant an outlier channel in the q/k/v input and in the down_proj input
        m.layers[0].input_layernorm.weight[3] = 40.0
        m.layers[1].mlp.up_proj.weight[5] *= 30.0
    calib = _calib()
    names = ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    spread = lambda a: float(a.max() / a.median())  # noqa: E731
    before = {n: spread(a) for n, a in collect_absmax(m, names, calib, 32).items()}
    ids = list(range(100, 160))
    ref = logits(m, ids)
    assert smooth_(m, calib, alpha=0.5) == 4 * 2
    after = {n: spread(a) for n, a in collect_absmax(m, names, calib, 32).items()}
    got = logits(m, ids)
    assert np.abs(ref - got).max() / np.abs(ref).max() < 1e-4  # same function
    for n in names:
        assert after[n] < 0.5 * before[n], (n, before[n], after[n])


def test_calibration_set_is_deterministic_and_fits_the_context(tiny):
    from gemma_export.loading import Tokenizer, tokenizer_for

    tok = Tokenizer(tokenizer_for("preset", None))
    a, digest = calibration_set(PRESETS["int4-b32"], tok, max_context=64)
    b, again = calibration_set(PRESETS["int4-b32"], tok, max_context=64)
    assert a == b and digest == again and len(a) == PRESETS["int4-b32"].calibration.samples
    assert {len(s) for s in a} == {64} and all(s[0] == tok.bos_id for s in a)


def test_input_ranges_do_not_depend_on_running_the_head(tiny):
    """The head runs only when its own input is observed; the other ranges come out the same."""
    calib = _calib(2, 20)
    alone = collect_absmax(tiny, ["layers.1.mlp.down_proj"], calib, 16)
    with_head = collect_absmax(tiny, ["layers.1.mlp.down_proj", "lm_head"], calib, 16)
    assert torch.equal(alone["layers.1.mlp.down_proj"], with_head["layers.1.mlp.down_proj"])
    assert with_head["lm_head"].shape == (tiny.cfg.hidden_size,) and with_head["lm_head"].max() > 0


def test_layer_hessians_are_the_input_products_of_each_linear(tiny, monkeypatch):
    """Per linear, 2/N sum x x^T over the calibration tokens: shared by q/k/v and gate/up, summed
    by blocks for wide inputs (a small block here) and with the layer cut short after the last
    linear, all equal to the products of inputs recorded from the layer's plain forward."""
    monkeypatch.setattr(calibrate, "GRAM_BLOCK", 8)
    calib = _calib(3, 16)
    walk = LayerInputs(tiny, calib)
    layer = tiny.layers[0]
    names = [f"layers.0.{n}" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    seen = {n: [] for n in names}
    handles = [tiny.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]))) for n in names]
    for x in walk.xs:
        layer(x, *walk.args[0])
    for h in handles:
        h.remove()
    got = walk.hessians(names)
    assert tiny.get_submodule("layers.0.mlp.down_proj").in_features > 2 * 8
    for n in names:
        x = torch.cat(seen[n]).double()
        torch.testing.assert_close(got[n].double(), 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-5)


def test_the_walk_runs_quantized_layers_as_their_forward_does(tiny):
    """advance() dequantizes each layer's weights once for all samples: the stored outputs equal
    the quantized layer's own forward, and the layer gets its QLinears back."""
    m = copy.deepcopy(tiny)
    quantize_(m, PRESETS["int4-b32-rtn"])
    walk = LayerInputs(m, _calib(2, 16))
    want = [m.layers[0](x, *walk.args[0])[0] for x in walk.xs]
    kinds = [type(mod) for mod in m.layers[0].modules()]
    walk.advance()
    assert [type(mod) for mod in m.layers[0].modules()] == kinds
    for a, b in zip(walk.xs, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
