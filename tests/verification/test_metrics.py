"""Per-position comparison metrics and perplexity."""

import numpy as np
import pytest

from gemma_export.verification.metrics import Comparison, perplexity


def test_identical_logits_are_perfect():
    x = np.random.default_rng(0).normal(size=(10, 50)).astype(np.float32)
    c = Comparison()
    c.add(x, x, targets=np.arange(10))
    s = c.summary()
    assert s["top1_agreement"] == 1.0 and s["max_abs_diff"] == 0.0 and s["mean_kl"] == 0.0
    assert s["perplexity_reference"] == pytest.approx(s["perplexity_test"])


def test_disagreement_is_measured():
    ref = np.zeros((4, 8), np.float32)
    ref[:, 0] = 5.0
    test = ref.copy()
    test[1, 0], test[1, 3] = 0.0, 5.0  # one position's argmax moves
    c = Comparison()
    c.add(ref, test)
    s = c.summary()
    assert s["top1_agreement"] == 0.75 and s["max_abs_diff"] == 5.0 and s["mean_kl"] > 0
    assert c.per_position()["top1"] == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="logit shapes differ"):
        c.add(ref, test[:, :4])


def test_perplexity_of_uniform_is_vocab_size():
    assert perplexity(np.zeros((3, 32)), [1, 2, 3]) == pytest.approx(32.0)
