"""The documented Python API (README and gemma_export/api.py), run as written on the tiny model."""

import subprocess
import sys

import gemma_export as ge
from gemma_export.verification.check import VerifyPlan
from helpers import TINY, T


def test_importing_the_package_stays_light():
    code = "import sys, gemma_export; print('torch' in sys.modules, callable(gemma_export.export))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]  # the API is reachable, torch is imported only when it runs


def test_export_open_generate_verify(tmp_path):
    out = tmp_path / "onnx"
    (manifest,) = ge.export(TINY, "onnx", out, prefill_len=T)
    assert manifest.format == "onnx" and (out / "manifest.json").is_file()
    model = ge.open(str(out))
    generated = model.generate("The capital of France is", max_new_tokens=4)
    assert len(generated.tokens) == 4 and isinstance(generated.text, str)
    result = ge.verify(out, plan=VerifyPlan(ge.api.DEFAULT_TEXT, positions=40, new_tokens=4))
    assert result.passed
    result.raise_if_failed()


def test_load_quantize_and_open_in_pytorch():
    loaded = ge.load("tiny", random_weights=True, max_context=64)
    info = ge.quantize(loaded, "int4-b32-rtn")
    assert info.quantized_modules == 15 and info.calibration_sha256 is None
    eager = ge.open("tiny", recipe="int4-b32-rtn", spec=TINY)
    assert "quantized in PyTorch (recipe int4-b32-rtn)" in eager.description
    assert ge.read_config("tiny").num_layers == 2
