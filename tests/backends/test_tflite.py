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
    assert read_manifest(out).program["signatures"] == ["decode", "prefill_16", "score_16"]
    with pytest.raises(UnsupportedError, match="--no-debug-outputs"):
        open_artifact(out).session.hidden_states([2, 3])


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
