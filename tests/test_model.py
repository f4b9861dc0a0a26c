"""The eager model against transformers on the tiny config, through prefill chunks and decode steps."""

import numpy as np
import pytest
import torch

from gemma_export.metrics import Comparison, Thresholds
from gemma_export.reference import hf_from_model, hf_logits
from gemma_export.session import TorchSession, feed, generate

EXACT = Thresholds(min_top1=1.0, max_abs_diff=1e-4, max_mean_kl=1e-8)


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
    assert not c.failures(EXACT), c.summary()


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


def test_context_overflow_is_refused(tiny):
    from gemma_export.errors import ConfigError

    s = TorchSession(tiny, prefill_len=16)
    with pytest.raises(ConfigError, match="max context"):
        s.decode(1, tiny.max_context)
