"""The export pipeline: refusals before any work, atomic targets, one quantization for many formats."""

import json

import numpy as np
import pytest
import torch

from gemma_export import pipeline
from gemma_export.artifact import read_manifest
from gemma_export.backends import get
from gemma_export.errors import ConfigError, UnsupportedError
from gemma_export.loading import ModelSpec
from gemma_export.pipeline import ExportJob, Target
from gemma_export.quant.quantize import quantized_state
from gemma_export.quant.recipes import PRESETS, QuantRecipe, Rule, Scheme
from helpers import CTX, FORMATS, TINY, T, cli


def job(fmt, out, **settings):
    return ExportJob.single(TINY, fmt, out, **{"prefill_len": T, **settings})


def test_job_is_validated():
    with pytest.raises(ConfigError, match="at least one target"):
        ExportJob(TINY, ())
    with pytest.raises(ConfigError, match="a format is named twice"):
        ExportJob(TINY, (Target("onnx", "a"), Target("onnx", "b")))
    with pytest.raises(ConfigError, match="prefill length must be at least 2"):
        job("onnx", "x", prefill_len=1)


def test_check_resolves_the_context_from_the_model(tmp_path):
    resolved, targets, recipe = pipeline.check(ExportJob.single(ModelSpec("tiny", random_weights=True), "onnx",
                                                                tmp_path / "x"))
    assert resolved.max_context == 1024 == resolved.model.max_context  # tiny's limit caps the default
    assert [t.format for t, _ in targets] == ["onnx"] and recipe.name == "fp32"
    with pytest.raises(ConfigError, match="exceeds max context"):
        pipeline.check(job("onnx", tmp_path / "x", prefill_len=512, max_context=CTX))


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(get("onnx"), "export", boom)
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="planted"):
        pipeline.export(job("onnx", out))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_not_overwritten(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        pipeline.export(job("onnx", out))
    with pytest.raises(ConfigError, match="not an artifact folder"):
        pipeline.export(job("onnx", out, force=True))
    assert (out / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_recipe_refused_before_work(fmt, tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nonsense'"):
        pipeline.export(job(fmt, tmp_path / "x", recipe="nonsense"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "qnn"])
def test_int8_kv_caches_refused_where_the_attention_reads_fp32(fmt, tmp_path):
    r = cli("export", "tiny", "--random-weights", "--format", fmt, "--kv-dtype", "int8", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "\n" not in r.output.strip(), r.output
    assert f"format {fmt} does not support recipe 'fp32+kv-int8': cannot lower int8 KV caches" in r.output
    assert "loading" not in r.output and not (tmp_path / "x").exists()


def _unsupported_pairs():
    from gemma_export.backends import supported_presets

    pairs = [(f, r) for f in FORMATS for r in sorted(PRESETS) if r not in supported_presets(f)]
    assert ("tflite", "int8-weights") in pairs and ("pte", "int8-weights") in pairs
    return pairs


@pytest.mark.parametrize("fmt,recipe", _unsupported_pairs())
def test_unsupported_format_recipe_pairs_are_refused_with_the_typed_error(fmt, recipe, tmp_path):
    """The other half of the backends' contract (tests/backends/test_contract.py): supported pairs
    export and pass verify."""
    progress = []
    with pytest.raises(UnsupportedError, match=f"format {fmt} does not support recipe"):
        pipeline.export(job(fmt, tmp_path / "x", recipe=recipe), progress.append)
    assert not (tmp_path / "x").exists() and not progress  # refused before loading anything


def test_recipe_files_are_judged_by_content(tmp_path):
    """A recipe file is refused for what it asks (static activations on XNNPACK), not for its name."""
    rules = (Rule("layers.*", Scheme(8, activations="int8-static")),)
    path = tmp_path / "static.toml"
    path.write_text(QuantRecipe("my-static", rules).to_toml())
    with pytest.raises(UnsupportedError, match="cannot lower int8-static activations"):
        pipeline.export(job("pte", tmp_path / "x", recipe=str(path)))
    # the same content under a preset's name is refused as well
    path.write_text(QuantRecipe("int8", rules).to_toml())
    with pytest.raises(UnsupportedError, match="int8-static"):
        pipeline.export(job("pte", tmp_path / "x", recipe=str(path)))
    partial = (Rule("layers.*", Scheme(4, "block", 32, activations="int8-dynamic")),)
    path.write_text(QuantRecipe("partial", partial).to_toml())
    with pytest.raises(UnsupportedError, match="a float embed_tokens among quantized weights"):
        pipeline.export(job("tflite", tmp_path / "x", recipe=str(path)))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_one_calibration_feeds_every_format(tmp_path, quantized_tiny):
    """`export --format onnx,tflite`: the model is calibrated and quantized once, and both artifacts
    hold the same codes (each also equal to a separate single-format quantization's)."""
    out = tmp_path / "build"
    args = ["export", "tiny", "--random-weights", "--max-context", CTX, "--prefill-len", T,
            "--recipe", "int4-b32", "--no-debug-outputs", "--out", out]
    r = cli(*args, "--format", "onnx,tflite")
    assert r.exit_code == 0, r.output
    assert r.output.count("quantizing in PyTorch") == 1 and "once for 2 formats" in r.output
    assert r.output.count("calibrating: ") == 1
    onnx, tfl = read_manifest(out / "onnx"), read_manifest(out / "tflite")
    assert (onnx.format, tfl.format) == ("onnx", "tflite")
    assert onnx.quantization == tfl.quantization and onnx.quantization["calibration_sha256"]
    stored = {fmt: get(fmt).read_codes(out / fmt, m) for fmt, m in (("onnx", onnx), ("tflite", tfl))}
    codes = [q.numpy() for q, _, _ in quantized_state(quantized_tiny("int4-b32")).values()]
    assert len(codes) == 15
    for fmt, arrays in stored.items():
        for q in codes:
            assert any(np.array_equal(s, q) or np.array_equal(s, q.T) for s in arrays), fmt

    # refused before any work: a destination that exists (without --force), a repeated format
    (tmp_path / "taken" / "tflite").mkdir(parents=True)
    r = cli(*args[:-1], tmp_path / "taken", "--format", "onnx,tflite")
    assert r.exit_code == 1 and "already exists" in r.output and "loading" not in r.output, r.output
    assert not (tmp_path / "taken" / "onnx").exists()
    r = cli(*args, "--format", "onnx,onnx")
    assert r.exit_code == 2 and "named twice" in r.output


@pytest.mark.slow  # lowers ExecuTorch
def test_the_same_export_gives_the_same_bytes_in_every_format(artifacts, tmp_path):
    """All formats exported once more (quantized once) equal the suite's shared exports byte for
    byte: no timestamps or timings in them; files readable under the umask like any new file.
    (The calibrated recipe is covered on the real 270M in the slow suite, and by
    test_calibration_is_deterministic.)"""
    import hashlib
    import os

    def tree(root):
        return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                           p.stat().st_mode & 0o777) for p in sorted(root.rglob("*"))}

    mask = os.umask(0)
    os.umask(mask)
    record = tmp_path / "build.json"
    pipeline.export(ExportJob.each(TINY, FORMATS, tmp_path / "b", prefill_len=T, images=False), record=record)
    for fmt in FORMATS:
        a, b = tree(artifacts.get(fmt)), tree(tmp_path / "b" / fmt)
        ma, mb = (json.loads((root / "manifest.json").read_text()) for root in (artifacts.get(fmt), tmp_path / "b" / fmt))
        assert ma == mb, (fmt, {k: (ma.get(k), mb.get(k)) for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)})
        assert a == b and len(a) >= 3, fmt
        assert {mode for _, mode in a.values()} <= {0o777 & ~mask, 0o666 & ~mask}
        assert (tmp_path / "b" / fmt).stat().st_mode & 0o777 == 0o777 & ~mask
    rec = json.loads(record.read_text())
    assert set(rec["seconds"]) == {"load_and_quantize", *FORMATS} and len(rec["artifacts"]) == 3


def test_calibration_is_deterministic(tiny):
    import copy

    from gemma_export.loading import Tokenizer, load
    from gemma_export.quant.quantize import quantize_model

    states = []
    for _ in range(2):
        model = copy.deepcopy(tiny)
        info = quantize_model(model, "int4-b32", Tokenizer(load(TINY).tokenizer_path))
        states.append((info.calibration_sha256, quantized_state(model)))
    (sha_a, a), (sha_b, b) = states
    assert sha_a == sha_b and a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
