"""The eager model against transformers on the tiny config, through prefill chunks and decode steps."""

import copy

import numpy as np
import pytest
import torch

from gemma_export.gemma3.reference import hf_from_model, hf_logits
from gemma_export.quant.recipes import Thresholds
from gemma_export.session import TorchSession, feed, generate
from gemma_export.verification.judge import Rule, judge
from gemma_export.verification.metrics import Comparison

EXACT = Rule(False, Thresholds(min_top1=1.0, max_abs_diff=1e-4, max_mean_kl=1e-8))


def exact(c: Comparison) -> list[str]:
    return list(judge(EXACT, {"logits": c.summary()}).failures)


@pytest.fixture(scope="module")
def hf_tiny(tiny):
    return hf_from_model(tiny)


def _ids(n, seed=1):
    return np.random.default_rng(seed).integers(3, 262_144, size=n).tolist()


@pytest.mark.parametrize("schedule", [[8], [1], [8, 1, 1, 5, 1, 3], [16, 7]])
def test_tiny_matches_transformers_past_the_window(tiny, hf_tiny, schedule):
    ids = _ids(120)  # window 16: runs 7x past it
    ref = hf_logits(hf_tiny, ids)
    s = TorchSession(tiny, prefill_len=16)
    c = Comparison()
    for p, lg in feed(s, ids, schedule=schedule):
        c.add(ref[p:p + len(lg)], lg)
    assert c.n == len(ids)
    assert not exact(c), c.summary()


def test_local_cache_is_window_sized(tiny):
    shapes = tiny.cache_shapes()
    cfg = tiny.cfg
    assert shapes[0][2] == cfg.sliding_window  # layer 0 local
    assert shapes[2][2] == tiny.max_context  # layer 1 global


def test_padding_in_a_prefill_chunk_does_not_reach_the_cache(tiny):
    ids = _ids(40, seed=3)
    a = TorchSession(tiny, prefill_len=16)
    b = TorchSession(tiny, prefill_len=32)
    la = np.concatenate([lg for _, lg in feed(a, ids, schedule=[5, 16, 3])])
    lb = np.concatenate([lg for _, lg in feed(b, ids, schedule=[32, 8])])
    assert np.abs(la - lb).max() < 1e-4


def test_greedy_generation_matches_transformers(tiny, hf_tiny):
    prompt = _ids(20, seed=5)
    ours = list(generate(TorchSession(tiny, prefill_len=16), prompt, 24))
    with torch.no_grad():
        out = hf_tiny.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    assert ours == out[0, len(prompt):].tolist()


def test_embed_then_decode_is_the_step(tiny):
    """The two halves an image encoder plugs into: decode() takes any embeddings."""
    ids = torch.tensor([_ids(12, seed=7)], dtype=torch.int32)
    pos, length = torch.zeros(1, dtype=torch.int32), torch.tensor([12], dtype=torch.int32)
    with torch.no_grad():
        whole, _ = tiny.step(ids, pos, length, tiny.new_cache())
        x = tiny.embed(ids)
        halves, _ = tiny.decode(x, pos, length, tiny.new_cache())
        shifted, _ = tiny.decode(x + 0.5, pos, length, tiny.new_cache())
    assert x.shape == (1, 12, tiny.cfg.hidden_size)
    assert torch.equal(whole, halves)
    assert not torch.allclose(whole, shifted)  # the embeddings given are the ones used


def test_the_fp16_npu_forms_change_no_output_and_are_undone(tiny):
    """npu_forms(fp16=True) carries the residual stream divided by RESIDUAL_SCALE and normalises
    rows scaled by their largest |x|: the same function in exact arithmetic."""
    from gemma_export.gemma3.model import RESIDUAL_SCALE, npu_forms

    ids = torch.tensor([_ids(12, seed=3)], dtype=torch.int32)
    pos, length = torch.zeros(1, dtype=torch.int32), torch.tensor([12], dtype=torch.int32)
    eps = [m.eps for m in tiny.modules() if hasattr(m, "eps")]
    with torch.no_grad():
        before, _, states = tiny.step(ids, pos, length, tiny.new_cache(), hidden=True)
        with npu_forms(tiny, -100.0, fp16=True):
            forms, _, scaled = tiny.step(ids, pos, length, tiny.new_cache(), hidden=True)
        after, _ = tiny.step(ids, pos, length, tiny.new_cache())
    assert torch.allclose(scaled * RESIDUAL_SCALE, states, rtol=1e-4, atol=1e-5)
    assert torch.allclose(forms, before, rtol=1e-4, atol=1e-5) and not torch.equal(forms, before)
    assert torch.equal(after, before) and [m.eps for m in tiny.modules() if hasattr(m, "eps")] == eps


def test_int8_kv_caches_round_per_token_and_head(tiny):
    """int8_per_token keeps every row within half a step of its own range; set_kv_dtype applies it
    to queries, keys and values in the global layers (local rings stay fp32), and "fp32" restores
    the model exactly."""
    from gemma_export.gemma3.model import int8_per_token

    x = torch.randn(1, 4, 7, 32) * torch.logspace(-3, 2, 7)[None, None, :, None]  # rows of very different ranges
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 255
    err = (int8_per_token(x) - x).abs()
    assert (err <= step / 2 + 1e-6 * step).all() and err.max() > 0
    m = copy.deepcopy(tiny)
    ids = torch.tensor([list(range(100, 116))], dtype=torch.int32)
    args = (torch.zeros(1, dtype=torch.int32), torch.tensor([16], dtype=torch.int32))

    def logits():
        with torch.no_grad():
            return m.step(ids, *args, m.new_cache())[0]

    fp32 = logits()
    m.set_kv_dtype("int8")
    assert m.kv_dtype == "int8"
    assert [layer.self_attn.kv_dtype for layer in m.layers] == ["fp32", "int8"]  # tiny: one local, one global
    int8 = logits()
    assert 0 < (int8 - fp32).abs().max() < 0.05 * fp32.abs().max()
    m.set_kv_dtype("fp32")
    assert torch.equal(logits(), fp32)
