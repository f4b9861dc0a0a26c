"""The backend registry and what every backend declares: names, lowering tables, runners."""

import numpy as np
import pytest
import torch

from gemma_export.backends import NAMES, REGISTRY, TARGETS, get, supported_presets
from gemma_export.backends.base import Lowering, match_weights
from gemma_export.errors import ConfigError, ExportError
from gemma_export.quant.algorithms import quantize_with, rtn_scales
from gemma_export.quant.recipes import PRESETS, QuantRecipe, Rule, Scheme


def test_every_backend_implements_the_protocol():
    assert NAMES == ("pte", "onnx", "tflite") and TARGETS == ("qnn",) and tuple(REGISTRY) == NAMES + TARGETS
    for name in REGISTRY:
        b = get(name)
        assert b.name == name and isinstance(b.lowering, Lowering)
        assert b.runner.env.startswith("GEMMA_") and b.runner.description
        assert all(callable(getattr(b, m)) for m in ("export", "open", "read_codes"))
    with pytest.raises(ConfigError, match="unknown format 'coreml'"):
        get("coreml")


def test_every_format_lowers_fp32_and_the_table_agrees_with_the_check():
    for fmt in NAMES:
        assert get(fmt).lowering.refusal(PRESETS["fp32"]) is None
        assert "fp32" in supported_presets(fmt)
        for name in supported_presets(fmt):
            assert get(fmt).lowering.refusal(PRESETS[name]) is None
    assert set(supported_presets("onnx")) == set(PRESETS) - {"fp16"}
    assert supported_presets("qnn") == ["fp16", "a16w8", "a8w8", "a16w4"]  # NPUs: static activations or fp16
    for fmt in NAMES:
        assert get(fmt).lowering.refusal(PRESETS["fp16"]) == "fp16 arithmetic (this format computes floats in fp32)"


def test_lowering_refusals_name_the_rule():
    pte = get("pte").lowering
    static = QuantRecipe("s", (Rule("layers.*", Scheme(8, activations="int8-static")),))
    assert pte.refusal(static) == "int8-static activations (rule 'layers.*')"
    blocked8 = QuantRecipe("b", (Rule("layers.*", Scheme(8, "block", 32, activations="int8-dynamic")),))
    assert pte.refusal(blocked8) == "block-wise int8 weights (rule 'layers.*')"
    partial = QuantRecipe("p", (Rule("layers.*", Scheme(8, activations="int8-dynamic")),))
    assert "a float embed_tokens among quantized weights" in get("tflite").lowering.refusal(partial)
    assert get("onnx").lowering.refusal(partial) is None


def test_weights_are_found_by_value_in_either_layout():
    w = torch.randn(8, 64)
    s = rtn_scales(w, 8, 64)
    q = quantize_with(w, s, 8)
    exact = (q.float() * s).numpy()
    codes = {"layer.weight": (q, s, Scheme(8), None)}
    stored = [("other", np.zeros((8, 64), np.float32)), ("t", np.ascontiguousarray(exact.T))]
    assert match_weights(codes, iter(stored), transposed=True) == {"t": ("layer.weight", "io")}
    with pytest.raises(ExportError, match="could not find the converted weight of layer.weight"):
        match_weights(codes, iter(stored[:1]), transposed=True)
