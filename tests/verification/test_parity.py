"""Sessions side by side: one pass for several pairs, perplexity, and locating a faulty layer."""

import copy

import numpy as np
import pytest
import torch

from gemma_export.session import TorchSession
from gemma_export.verification.parity import locate, perplexity_of, schedule_for, teacher_forced, teacher_forced_many
from helpers import random_ids


@pytest.fixture(scope="module")
def faulty(tiny):
    bad = copy.deepcopy(tiny)
    with torch.no_grad():
        bad.layers[1].mlp.down_proj.weight.mul_(3.0)
    return bad


def test_schedule_covers_every_entry_point():
    assert schedule_for(16) == [16, 1, 1, 12, 1, 4]


def test_one_pass_compares_every_pair_like_separate_passes(tiny, faulty):
    ids = random_ids(60)
    a, b = TorchSession(tiny, prefill_len=16), TorchSession(faulty, prefill_len=16)
    many = teacher_forced_many({"a": a, "b": b}, [("a", "b"), ("a", "a")], ids, schedule_for(16))
    alone = teacher_forced(a, b, ids).summary()
    assert many[("a", "b")].summary() == alone and alone["mean_kl"] > 1e-6 and alone["max_abs_diff"] > 1e-3
    assert many[("a", "a")].summary()["mean_kl"] == 0.0


def test_perplexity_matches_the_comparison(tiny):
    ids = random_ids(60, seed=4)
    s = TorchSession(tiny, prefill_len=16)
    ppl = teacher_forced(s, TorchSession(tiny, prefill_len=16), ids).summary()["perplexity_test"]
    assert perplexity_of(s, ids) == pytest.approx(ppl, rel=1e-5)


def test_locate_names_the_first_diverging_layer(tiny, faulty):
    ids = list(range(1000, 1016))
    found = locate(TorchSession(tiny, prefill_len=16), TorchSession(faulty, prefill_len=16), ids)
    assert found["first_diverging"] == "layer 1" and found["first_diverging_layer"] == 1
    assert found["relative_error"]["embedding"] == 0.0 and found["relative_error"]["layer 0"] == 0.0
    same = locate(TorchSession(tiny, prefill_len=16), TorchSession(tiny, prefill_len=16), ids)
    assert same["first_diverging"] is None and np.isfinite(list(same["relative_error"].values())).all()
