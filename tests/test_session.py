"""The Session protocol: room checks, padding, feed schedules and generation, on the eager model."""

import numpy as np
import pytest

from gemma_export.errors import ConfigError
from gemma_export.session import BaseSession, Sampling, SessionInfo, TorchSession, feed, generate


class Recorder(BaseSession):
    """A runtime stub that records what BaseSession hands it (the eager model is tested below)."""

    def __init__(self, pads: bool):
        self.info = SessionInfo(prefill_len=8, max_context=32, vocab_size=5, window=4)
        self.pads_prefill = pads
        self.calls = []

    def reset(self):
        self.calls.clear()

    def _run(self, tokens, pos, n, decode):
        self.calls.append((tokens.tolist(), pos, n, decode))
        return np.arange(tokens.shape[1] * 5, dtype=np.float32).reshape(tokens.shape[1], 5)

    def _hidden(self, tokens, n):
        return np.zeros((3, tokens.shape[1], 2), np.float32)


def test_base_session_pads_chunks_and_slices_results():
    s = Recorder(pads=True)
    assert s.prefill([5, 6, 7], 4).shape == (3, 5)
    assert s.calls[-1] == ([[5, 6, 7, 0, 0, 0, 0, 0]], 4, 3, False)
    assert s.decode(9, 7).shape == (5,) and s.calls[-1] == ([[9]], 7, 1, True)
    assert s.hidden_states([1, 2]).shape == (3, 2, 2)
    dynamic = Recorder(pads=False)
    dynamic.prefill([5, 6, 7], 0)
    assert dynamic.calls[-1][0] == [[5, 6, 7]]


def test_room_checks():
    s = Recorder(pads=True)
    with pytest.raises(ConfigError, match="exceed the prefill length 8"):
        s.prefill(list(range(9)), 0)
    with pytest.raises(ConfigError, match="exceed the max context 32"):
        s.decode(1, 32)
    with pytest.raises(ConfigError, match="empty token list"):
        s.prefill([], 0)
    assert not s.calls  # refused before the runtime ran


def test_feed_follows_the_schedule():
    s = Recorder(pads=True)
    starts = [p for p, _ in feed(s, list(range(23)), schedule=[8, 1, 3])]
    assert starts == [0, 8, 9, 12, 20, 21]  # the schedule repeats; the last chunk is what is left
    assert [c[2] for c in s.calls] == [8, 1, 3, 8, 1, 2]
    assert [c[3] for c in s.calls] == [False, True, False, False, True, False]


def test_eager_context_overflow_is_refused(tiny):
    s = TorchSession(tiny, prefill_len=16)
    with pytest.raises(ConfigError, match="max context"):
        s.decode(1, tiny.max_context)


def test_sampling_is_seeded_and_greedy_is_deterministic(tiny):
    s = TorchSession(tiny, prefill_len=16)
    prompt = [2, 100, 200]
    hot = Sampling(temperature=1.0, seed=7)
    assert list(generate(s, prompt, 6, sampling=hot)) == list(generate(s, prompt, 6, sampling=hot))
    assert list(generate(s, prompt, 6)) == list(generate(s, prompt, 6))
    with pytest.raises(ConfigError, match="prompt is empty"):
        list(generate(s, [], 3))
