"""TFLite specifics: the codes as the flatbuffer stores them, signatures without the debug one."""

import numpy as np
import pytest

from gemma_export.artifact import read_manifest
from gemma_export.backends.tflite_codes import TfliteFile, read_codes
from gemma_export.errors import UnsupportedError
from gemma_export.runtime import open_artifact


@pytest.mark.slow
def test_fp32_file_holds_no_integer_weights(artifacts):
    assert read_codes(artifacts.get("tflite") / "model.tflite") == {}


@pytest.mark.slow
def test_int4_scales_are_ours_in_fp16(artifacts, quantized_tiny):
    out = artifacts.get("tflite", "int4-b32-rtn", debug=False)
    model = quantized_tiny("int4-b32-rtn")
    ours = [m.scale.numpy() for m in model.modules() if hasattr(m, "scale") and hasattr(m, "qweight")]
    with TfliteFile(out / "model.tflite") as f:
        stored = [got[1] for sg, t in f.tensors(0) if (got := f.codes(sg, t)) is not None]
    for s in ours:
        assert any(x.shape == s.shape and np.array_equal(x, s) for x in stored)


@pytest.mark.slow
def test_release_artifact_has_no_debug_signature(artifacts):
    out = artifacts.get("tflite", "int4-b32-rtn", debug=False)
    assert read_manifest(out).program["signatures"] == ["prefill_16", "decode"]
    with pytest.raises(UnsupportedError, match="--no-debug-outputs"):
        open_artifact(out).session.hidden_states([2, 3])
