"""TFLite specifics: the LiteRT-LM bundle around the model, the codes as the flatbuffer stores them,
the signatures LiteRT-LM drives, and the padding it feeds."""

import numpy as np
import pytest

from gemma_export.artifact import read_manifest
from gemma_export.backends.tflite import tflite_section
from gemma_export.backends.tflite_codes import TfliteFile, read_codes
from gemma_export.errors import UnsupportedError
from gemma_export.runtime import open_artifact


@pytest.mark.slow
def test_fp32_file_holds_no_integer_weights(artifacts):
    path = artifacts.get("tflite") / "model.litertlm"
    assert read_codes(path, tflite_section(path)) == {}


@pytest.mark.slow
def test_int4_scales_are_ours_in_fp16(artifacts, quantized_tiny):
    out = artifacts.get("tflite", "int4-b32-rtn", debug=False)
    model = quantized_tiny("int4-b32-rtn")
    ours = [m.scale.numpy() for m in model.modules() if hasattr(m, "scale") and hasattr(m, "qweight")]
    with TfliteFile(out / "model.litertlm", section=tflite_section(out / "model.litertlm")) as f:
        stored = [got[1] for sg, t in f.tensors(0) if (got := f.codes(sg, t)) is not None]
    for s in ours:
        assert any(x.shape == s.shape and np.array_equal(x, s) for x in stored)


@pytest.mark.slow
def test_release_artifact_has_no_debug_signature(artifacts):
    out = artifacts.get("tflite", "int4-b32-rtn", debug=False)
    assert read_manifest(out).program["signatures"] == ["decode", "prefill_16"]  # LiteRT-LM's two
    with pytest.raises(UnsupportedError, match="--no-debug-outputs"):
        open_artifact(out).session.hidden_states([2, 3])


@pytest.mark.slow
def test_the_session_runs_on_the_threads_asked_for(artifacts):
    """LiteRT's CPU runs one thread unless told otherwise: its pool starts n - 1 workers."""
    import gc
    import os

    def threads_while_running(n):
        s = open_artifact(artifacts.get("tflite"), threads=n).session
        s.prefill([2, 900, 1000], 0)
        count = len(os.listdir("/proc/self/task"))
        del s
        gc.collect()
        return count

    assert threads_while_running(3) - threads_while_running(1) == 2


@pytest.mark.slow
def test_a_padded_prefill_chunk_keeps_only_its_valid_tokens(artifacts, tiny):
    """LiteRT-LM pads a short prefill chunk with token 0 at position 0: the graph must count the
    valid tokens from input_pos, or padding would enter the cache and shift every later position."""
    from gemma_export.session import TorchSession

    s, ref = open_artifact(artifacts.get("tflite")).session, TorchSession(tiny, prefill_len=16)
    for session in (s, ref):
        session.reset()
        session.prefill([2, 900, 1000], 0)  # 3 of 16 slots valid
        session.prefill([5, 6, 7, 8, 9], 3)  # then a chunk at position 3
    np.testing.assert_allclose(s.decode(11, 8), ref.decode(11, 8), atol=1e-3)


def _ring_run(model, ids, chunk, steps, ring):
    """Logits of teacher-forced prefill chunks (each padded to `chunk` with token 0) then decode
    steps, through the TFLite graph's step function in eager PyTorch (ring) or the model's own."""
    import torch

    from gemma_export.backends.tflite import _Step, cache_shapes

    step = _Step(model, logits=True)
    shapes = cache_shapes(model) if ring else model.cache_shapes()
    caches = {n: torch.zeros(s) for n, s in zip(step.names, shapes)}

    def run(part, pos, width):  # one step of `part` at `pos`, padded to `width`; its valid logits
        nonlocal caches
        tokens = torch.tensor([part + [0] * (width - len(part))], dtype=torch.int32)
        input_pos = torch.zeros(width, dtype=torch.int32)
        input_pos[:len(part)] = torch.arange(pos, pos + len(part))
        if ring:
            res = step(tokens, input_pos, **caches)
        else:  # the model's sliding cache (the reference of every other format)
            logits, new = model.step(tokens, input_pos[:1], torch.tensor([len(part)], dtype=torch.int32),
                                     list(caches.values()))
            res = {"logits": logits, **dict(zip(step.names, new))}
        caches = {n: res[n] for n in step.names}
        return res["logits"][0, :len(part)]

    prompt, rest = ids[:-steps], ids[-steps:]
    out = [run(prompt[p:p + chunk], p, chunk) for p in range(0, len(prompt), chunk)]
    out += [run([tok], len(prompt) + i, 1) for i, tok in enumerate(rest)]
    return torch.cat(out)


@pytest.mark.parametrize("chunk", [5, 16, 24])  # shorter than, equal to and longer than the window
def test_ring_cache_attention_equals_the_sliding_cache_past_the_window(tiny, chunk):
    """The TFLite graph's in-place ring cache (decode writes one slot, prefill rewrites it from
    [cache, chunk]) gives the model's own logits, through padded chunks and decode steps that wrap
    the window's ring many times."""
    import torch

    from helpers import random_ids

    ids = random_ids(90, seed=3)
    with torch.no_grad():
        ring = _ring_run(tiny, ids, chunk, 40, ring=True)
        ref = _ring_run(tiny, ids, chunk, 40, ring=False)
    assert ring.shape == (90, tiny.cfg.vocab_size)
    torch.testing.assert_close(ring, ref, atol=1e-4, rtol=1e-4)
