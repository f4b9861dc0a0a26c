"""Quantized artifacts: the integer codes in the file are the PyTorch codes, bit for bit."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from converters import supported_presets
from converters.onnx import read_codes
from gemma_export.metrics import Thresholds
from gemma_export.package import ExportRequest, export, open_artifact, read_manifest
from gemma_export.api import quantize_model
from gemma_export.loading import load
from gemma_export.quantize import QEmbedding, QLinear, pack_nibbles
from gemma_export.tokenizer import Tokenizer
from gemma_export.recipes import PRESETS
from gemma_export.session import TorchSession
from gemma_export.verify import teacher_forced
from test_converters import CTX, T, TINY

# Same codes, but activation quantization rounds a few values differently in each runtime (ONNX
# evaluates the same float ops in another order; XNNPACK uses its own kernel). The tiny random
# model's logits are nearly flat, so its top-1 is fragile: judge mainly by KL.
LOWERING = {"onnx": Thresholds(min_top1=0.9, max_mean_kl=1e-5),
            "pte": Thresholds(min_top1=0.85, max_mean_kl=1e-4),
            "tflite": Thresholds(min_top1=0.85, max_mean_kl=1e-4)}


@pytest.fixture(scope="module", params=[("onnx", "int8"), ("onnx", "int4-b32-rtn"), ("pte", "int4-b32-rtn"),
                                        ("tflite", "int8"), ("tflite", "int4-b32-rtn")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def quantized(request, tmp_path_factory, tiny):
    fmt, recipe = request.param
    assert recipe in supported_presets(fmt)
    out = tmp_path_factory.mktemp(f"{fmt}-{recipe}") / "art"
    # pte keeps its debug method: it must not drag the head's unused codes into the program
    req = ExportRequest(fmt, prefill_len=T, max_context=CTX, recipe=recipe, debug_outputs=fmt == "pte")
    export(TINY, req, out)
    eager = copy.deepcopy(tiny)
    loaded = load(TINY)  # the same tokenizer and calibration set the export used
    quantize_model(eager, recipe, Tokenizer(loaded.tokenizer_path))
    return fmt, recipe, out, eager


def test_codes_in_the_file_equal_the_pytorch_codes(quantized):
    fmt, recipe, out, eager = quantized
    if fmt == "tflite":  # INT8 / packed INT4 tensors, read back through the flatbuffer schema
        from converters.tflite_codes import read_codes as read_tflite_codes

        stored = list(read_tflite_codes(out / "model.tflite").values())
        ours = {n: m.qweight.numpy() for n, m in eager.named_modules() if isinstance(m, (QLinear, QEmbedding))}
        assert len(ours) == 15 and len(stored) >= 15
        for name, q in ours.items():
            assert any(s.shape == q.shape and np.array_equal(s, q) for s in stored), name
        return
    if fmt == "pte":  # XNNPACK's named blobs (and the shared table in model.ptd), byte for byte
        from converters.executorch import read_named_data

        blobs = set(read_named_data(out, read_manifest(out)).values())
        mods = [m for m in eager.modules() if isinstance(m, (QLinear, QEmbedding))]
        assert len(mods) == 15
        for m in mods:
            codes = pack_nibbles(m.qweight) if m.scheme.bits == 4 else m.qweight
            assert codes.numpy().tobytes() in blobs
            if m.scheme.bits == 4:  # blockwise scales are blobs too (bf16); per-channel ones are inline
                assert m.scale.to(torch.bfloat16).view(torch.uint8).numpy().tobytes() in blobs
        # the table is stored once: the lookup and XNNPACK's head read the same bytes
        assert (out / "model.ptd").stat().st_size < eager.embed_tokens.qweight.numel() * 0.6
        return
    stored = list(read_codes(out, read_manifest(out)).values())
    ours = {n: m.qweight.numpy() for n, m in eager.named_modules() if isinstance(m, (QLinear, QEmbedding))}
    assert len(stored) == len(ours) == 15
    for name, q in ours.items():
        assert any(s.shape in (q.shape, q.T.shape) and (np.array_equal(s, q) or np.array_equal(s, q.T))
                   for s in stored), name
    bits = PRESETS[recipe].scheme_for("layers.0.mlp.up_proj").bits
    assert max(int(np.abs(s).max()) for s in stored) <= 2 ** (bits - 1)


def test_quantized_artifact_matches_the_pytorch_quantized_model(quantized):
    fmt, recipe, out, eager = quantized
    m = read_manifest(out)
    assert m["recipe"]["name"] == recipe and m["format"] == fmt
    ids = np.random.default_rng(2).integers(3, 262_144, size=80).tolist()
    c = teacher_forced(TorchSession(eager, prefill_len=T), open_artifact(out).session, ids)
    # ONNX int8 leaves the activation quantization to MatMulNBits (its own rounding, like XNNPACK)
    th = LOWERING["pte"] if (fmt, recipe) == ("onnx", "int8") else LOWERING[fmt]
    assert not c.failures(th), c.summary()


def test_verify_judges_runtime_quantized_activations_against_fp32(quantized, tmp_path):
    """Every preset leaves activation quantization to the runtime, which rounds its own way: verify
    compares artifact and recipe with fp32. An artifact whose codes are not the recipe's fails."""
    from gemma_export.cli import default_eval_text
    from gemma_export.recipes import resolve
    from gemma_export.report import VerifyPlan, verify_artifact

    fmt, recipe, out, _ = quantized
    plan = VerifyPlan(default_eval_text(), positions=160, new_tokens=4)
    r = verify_artifact(out, plan).report
    assert r["judged"].startswith("against fp32") and r["pass"], (r["failures"], r["against_fp32"])
    if recipe != "int4-b32-rtn":
        return
    # the same int4 file claiming the int8 recipe: far more loss than int8 in PyTorch has
    wrong = tmp_path / "claims-int8"
    shutil.copytree(out, wrong)
    m = json.loads((wrong / "manifest.json").read_text())
    m["recipe"], m["request"]["recipe"] = resolve("int8").to_dict(), "int8"
    (wrong / "manifest.json").write_text(json.dumps(m))
    r = verify_artifact(wrong, plan).report
    assert not r["pass"] and any("mean KL to fp32" in f for f in r["failures"]), r["against_fp32"]


def test_relative_judgement_bounds():
    from gemma_export.verify import relative_failures

    recipe = {"mean_kl": 0.0130, "top1_agreement": 0.92}
    assert not relative_failures({"mean_kl": 0.0140, "top1_agreement": 0.91}, recipe)
    assert len(relative_failures({"mean_kl": 0.0200, "top1_agreement": 0.85}, recipe)) == 2
    # a near-lossless recipe still leaves room for a different rounding (absolute slack)
    assert not relative_failures({"mean_kl": 0.0009, "top1_agreement": 0.97}, {"mean_kl": 1e-5, "top1_agreement": 0.98})


def test_int4_artifact_is_smaller(quantized):
    fmt, recipe, out, _ = quantized
    m = read_manifest(out)
    size = sum(f["bytes"] for name, f in m["files"].items() if name.startswith("model."))
    fp32 = 16_832_448 * 4  # tiny's parameters in fp32
    assert size < fp32 * (0.3 if recipe.startswith("int4") else 0.45)


def test_onnx_lowers_a_static_activation_recipe_file(tmp_path, tiny):
    """Static int8/int16 activations (calibrated per-tensor scales) from a recipe file, through ONNX."""
    from gemma_export.recipes import QuantRecipe, Rule, Scheme

    rules = (Rule("embed_tokens", Scheme(8, activations="int16-static")),
             Rule("layers.*", Scheme(8, "block", 32, activations="int8-static")))
    path = tmp_path / "static.toml"
    path.write_text(QuantRecipe("static-test", rules).to_toml())
    out = tmp_path / "art"
    export(TINY, ExportRequest("onnx", prefill_len=T, max_context=CTX, recipe=str(path), debug_outputs=False), out)
    assert read_manifest(out)["recipe"]["name"] == "static-test"
    eager = copy.deepcopy(tiny)
    quantize_model(eager, str(path), Tokenizer(load(TINY).tokenizer_path))
    assert all(float(m.act_scale) > 0 for m in eager.modules() if isinstance(m, QLinear))
    ids = np.random.default_rng(3).integers(3, 262_144, size=60).tolist()
    c = teacher_forced(TorchSession(eager, prefill_len=T), open_artifact(out).session, ids)
    assert not c.failures(LOWERING["onnx"]), c.summary()


def test_one_calibration_feeds_every_format(tmp_path):
    """`export --format onnx,tflite`: the model is calibrated and quantized once, and both artifacts
    hold the same codes (each also equal to a separate single-format quantization's)."""
    from click.testing import CliRunner

    from converters.tflite_codes import read_codes as read_tflite_codes
    from gemma_export.cli import cli

    out = tmp_path / "build"
    args = ["export", "tiny", "--random-weights", "--max-context", str(CTX), "--prefill-len", str(T),
            "--recipe", "int4-b32", "--no-debug-outputs", "--out", str(out)]
    r = CliRunner().invoke(cli, [*args, "--format", "onnx,tflite"])
    assert r.exit_code == 0, r.output
    assert r.output.count("quantizing in PyTorch") == 1 and "once for 2 formats" in r.output
    assert r.output.count("calibrating: ") == 1
    onnx, tfl = read_manifest(out / "onnx"), read_manifest(out / "tflite")
    assert (onnx["format"], tfl["format"]) == ("onnx", "tflite")
    assert onnx["quantization"] == tfl["quantization"] and onnx["quantization"]["calibration_sha256"]
    from_onnx = {np.asarray(c).tobytes() for c in read_codes(out / "onnx", onnx).values()}
    from_onnx |= {np.asarray(c).T.copy().tobytes() for c in read_codes(out / "onnx", onnx).values()}
    from_tflite = [c for c in read_tflite_codes(out / "tflite" / "model.tflite").values()]
    eager = load(TINY).model
    quantize_model(eager, "int4-b32", Tokenizer(load(TINY).tokenizer_path))
    mods = [m for m in eager.modules() if isinstance(m, (QLinear, QEmbedding))]
    assert len(mods) == 15
    for m in mods:
        q = m.qweight.numpy()
        assert q.tobytes() in from_onnx
        assert any(s.shape == q.shape and np.array_equal(s, q) for s in from_tflite)

    # refused before any work: a destination that exists (without --force), a repeated format
    (tmp_path / "taken" / "tflite").mkdir(parents=True)
    r = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "taken"), "--format", "onnx,tflite"])
    assert r.exit_code == 1 and "already exists" in r.output and "loading" not in r.output, r.output
    assert not (tmp_path / "taken" / "onnx").exists()
    r = CliRunner().invoke(cli, [*args, "--format", "onnx,onnx"])
    assert r.exit_code == 2 and "named twice" in r.output
