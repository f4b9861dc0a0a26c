"""The contract every backend keeps, tested without a per-format branch: an artifact that runs in
the format's own runtime, matches PyTorch past the window, holds the PyTorch codes bit for bit and
passes `verify` (unsupported pairs are refused: tests/test_pipeline.py)."""

import json

import numpy as np
import pytest

from gemma_export.artifact import read_manifest
from gemma_export.backends import get, supported_presets
from gemma_export.backends.onnx import SLACK as ONNX_SLACK
from gemma_export.errors import ArtifactError
from gemma_export.quant.quantize import quantized_state
from gemma_export.quant.recipes import Thresholds
from gemma_export.runtime import open_artifact
from gemma_export.session import TorchSession
from gemma_export.verification.check import VerifyPlan, verify_artifact
from gemma_export.verification.judge import Rule, judge
from gemma_export.verification.parity import locate, parity, teacher_forced
from helpers import CTX, TEXT, T, cli, plant, random_ids

SLOW = pytest.mark.slow
# the fast run keeps ONNX; the TFLite conversion and ExecuTorch lowering run in `make test`
FP32 = [pytest.param("onnx"), pytest.param("tflite", marks=SLOW), pytest.param("pte", marks=SLOW)]
# formats a stock LLM runtime drives as shipped
STOCK = [pytest.param("onnx"), pytest.param("pte", marks=SLOW), pytest.param("tflite", marks=SLOW)]
# fp32 artifacts must agree with eager PyTorch to float rounding
EXACT = Rule(False, Thresholds(min_top1=1.0, min_top5=1.0, max_mean_kl=1e-8, max_abs_diff=1e-3))
QUANTIZED = [pytest.param(p, marks=SLOW, id=f"{p[0]}-{p[1]}")
             for p in (("onnx", "int8"), ("onnx", "int4-b32-rtn"), ("pte", "int4-b32-rtn"), ("tflite", "int8"),
                       ("tflite", "int4-b32-rtn"))]
# Same codes, but activation quantization rounds a few values differently in each runtime (ONNX
# evaluates the same float ops in another order; XNNPACK uses its own kernel). The tiny random
# model's logits are nearly flat, so its top-1 is fragile: judge mainly by KL.
LOWERING = {"onnx": Thresholds(min_top1=0.9, max_mean_kl=1e-5),
            "pte": Thresholds(min_top1=0.85, max_mean_kl=1e-4),
            "tflite": Thresholds(min_top1=0.85, max_mean_kl=1e-4)}


def failures(rule, comparison):
    return list(judge(rule, {"artifact": comparison.summary()}).failures)


@pytest.mark.parametrize("fmt", FP32)
def test_manifest_describes_the_artifact(artifacts, fmt):
    m = read_manifest(artifacts.get(fmt))
    assert m.format == fmt and m.prefill_len == T and m.max_context == CTX and m.window == 16
    # onnxruntime-genai sizes local buffers window + slack; the pte's local rings hold window + chunk - 1
    slack = {"onnx": ONNX_SLACK, "pte": T - 1}.get(fmt, 0)
    assert m.cache_lengths[1] == CTX and m.cache_lengths[0] == 16 + slack
    assert set(m.files) >= {"tokenizer.json", m.program["file"]}
    assert all(len(f.sha256) == 64 for f in m.files.values())
    assert "torch" in m.versions and m.model.config["name"] == "tiny"
    assert m.tokenizer.stop == ("<end_of_turn>", "<eos>") and "{prompt}" in m.tokenizer.chat_template
    # each names its inputs and outputs as the runtime sees them (a runtime's prefill may have no logits)
    assert all(ep["inputs"] and ep["outputs"] for ep in m.entry_points.values())
    assert any(e["name"] == "logits" for ep in m.entry_points.values() for e in ep["outputs"])


@pytest.mark.parametrize("fmt", FP32)
def test_fp32_artifact_matches_pytorch_past_the_window(artifacts, fmt, tiny):
    opened = open_artifact(artifacts.get(fmt), hashes=True)
    ids = random_ids(150)  # > 9x the window
    res = parity(TorchSession(tiny, prefill_len=T), opened.session, ids, ids[:20], 32)
    assert res.teacher_forced.n == 150
    verdict = judge(EXACT, {"artifact": res.teacher_forced.summary()}, greedy=(res.greedy_reference, res.greedy_test))
    assert verdict.passed, (verdict.failures, res.summary())



@pytest.mark.parametrize("fmt", FP32)
def test_a_runners_prefill_gives_the_last_logits_of_a_scored_prefill(artifacts, fmt, tiny):
    """prefill_last runs a chunk as the runtime's LLM runner does (pte: forward computes the head
    for the last token only; tflite: prefill_<T> without logits, then decode), on the same caches:
    chunk after chunk past the window, its logits are the scored prefill's last row."""
    ids = random_ids(3 * T + 5, seed=7)
    scored, last = open_artifact(artifacts.get(fmt)).session, open_artifact(artifacts.get(fmt)).session
    reference = TorchSession(tiny, prefill_len=T)
    for s in (scored, last, reference):
        s.reset()
    for pos in range(0, len(ids), T):
        chunk = ids[pos:pos + T]
        want = scored.prefill(chunk, pos)[-1]
        got = last.prefill_last(chunk, pos)
        assert got.shape == want.shape == (tiny.cfg.vocab_size,)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got, reference.prefill(chunk, pos)[-1], atol=1e-3, rtol=0)
    np.testing.assert_allclose(last.decode(ids[0], len(ids)), scored.decode(ids[0], len(ids)), atol=1e-4, rtol=0)

@pytest.mark.parametrize("fmt", STOCK)
@pytest.mark.parametrize("words", [6, 60])  # one prefill chunk; many chunks, far past the window
def test_the_runtimes_own_llm_api_generates_the_pytorch_greedy_text(artifacts, tiny, fmt, words):
    """The artifact as shipped, driven by the runtime's stock LLM runner (not our session), says
    what the PyTorch model says."""
    from gemma_export.loading import Tokenizer
    from gemma_export.session import generate

    out = artifacts.get(fmt)
    m = read_manifest(out)
    text = " ".join(TEXT.read_text().split()[:words])
    tok = Tokenizer(out / m.tokenizer.file)
    ids = tok.encode(text)
    assert (len(ids) > 2 * T) == (words > 10)
    want = [t for t in generate(TorchSession(tiny, prefill_len=T), ids, 12, tok.stop_ids) if t not in tok.stop_ids]
    got = get(fmt).stock_generate(out, m, text, 12)
    if got.tokens is None:  # a runner that streams text only
        assert got.text == tok.decode(want)
    else:
        assert list(got.tokens) == want, (got, want)


@pytest.mark.parametrize("fmt", FP32)
def test_generate_from_the_artifact_on_the_command_line(artifacts, fmt):
    res = cli("generate", artifacts.get(fmt), "--prompt", "Hello", "--max-new-tokens", "4", "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["tokens"]) == 4


@pytest.mark.parametrize("fmt", FP32)
def test_truncated_model_file_is_reported(artifacts, fmt, tmp_path):
    copy = artifacts.copy(fmt, tmp_path / "copy")
    f = copy / read_manifest(copy).program["file"]
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        open_artifact(copy)


@pytest.mark.parametrize("fmt", FP32)
def test_locate_names_the_planted_faulty_layer(artifacts, fmt, tiny, tmp_path):
    ids = list(range(1000, 1016))
    ref = TorchSession(tiny, prefill_len=T)
    clean = locate(ref, open_artifact(artifacts.get(fmt)).session, ids)
    assert clean["first_diverging"] is None, clean
    assert max(clean["relative_error"].values()) < 1e-4
    bad = artifacts.copy(fmt, tmp_path / "faulty")
    where = plant(bad, tiny.layers[1].mlp.down_proj.weight.detach().numpy())
    found = locate(ref, open_artifact(bad, hashes=True).session, ids)
    assert found["first_diverging"] == "layer 1", (where, found)
    assert found["relative_error"]["layer 0"] < 1e-4


# ----------------------------------------------------------------------------------------------
# Quantized artifacts: the PyTorch codes, bit for bit, and a passing verify
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", QUANTIZED)
def test_codes_in_the_file_equal_the_pytorch_codes(artifacts, quantized_tiny, pair):
    fmt, recipe = pair
    assert recipe in supported_presets(fmt)
    # pte keeps its debug method: it must not drag the head's unused codes into the program
    out = artifacts.get(fmt, recipe, debug=fmt == "pte")
    stored = get(fmt).read_codes(out, read_manifest(out))
    ours = {n: q.numpy() for n, (q, _, _) in quantized_state(quantized_tiny(recipe)).items()}
    assert len(ours) == 15
    for name, q in ours.items():
        assert any(np.array_equal(s, q) or np.array_equal(s, q.T) for s in stored), name
    bits = 4 if recipe.startswith("int4") else 8
    assert max(int(np.abs(s).max()) for s in stored) <= 2 ** (bits - 1)


@pytest.mark.parametrize("pair", QUANTIZED)
def test_quantized_artifact_matches_the_pytorch_quantized_model(artifacts, quantized_tiny, pair):
    fmt, recipe = pair
    out = artifacts.get(fmt, recipe, debug=fmt == "pte")
    m = read_manifest(out)
    assert m.recipe_name == recipe and m.format == fmt
    ids = random_ids(80, seed=2)
    c = teacher_forced(TorchSession(quantized_tiny(recipe), prefill_len=T), open_artifact(out).session, ids)
    # ONNX leaves the activation quantization to MatMulNBits (its own rounding, like XNNPACK)
    th = LOWERING["pte"] if fmt == "onnx" else LOWERING[fmt]
    assert not failures(Rule(False, th), c), c.summary()


@pytest.mark.parametrize("pair", QUANTIZED)
def test_int4_artifact_is_smaller(artifacts, pair):
    fmt, recipe = pair
    m = read_manifest(artifacts.get(fmt, recipe, debug=fmt == "pte"))
    size = sum(f.bytes for name, f in m.files.items() if name.startswith("model."))
    fp32 = 16_832_448 * 4  # tiny's parameters in fp32
    packed_tokenizer = 6e6  # a LiteRT-LM bundle carries its tokenizer (5.6 MB compressed)
    assert size < fp32 * (0.3 if recipe.startswith("int4") else 0.45) + packed_tokenizer


@pytest.mark.parametrize("pair", QUANTIZED)
def test_verify_judges_runtime_quantized_activations_against_fp32(artifacts, pair, tmp_path):
    """Every preset leaves activation quantization to the runtime, which rounds its own way: verify
    compares artifact and recipe with fp32. An artifact whose codes are not the recipe's fails."""
    from gemma_export.api import DEFAULT_TEXT
    from gemma_export.quant.recipes import resolve

    fmt, recipe = pair
    out = artifacts.get(fmt, recipe, debug=fmt == "pte")
    plan = VerifyPlan(DEFAULT_TEXT, positions=96, new_tokens=4)  # 6 windows
    r = verify_artifact(out, plan).report
    assert r["judged"].startswith("against fp32") and r["pass"], (r["failures"], r["against_fp32"])
    if recipe != "int4-b32-rtn":
        return
    # the same int4 file claiming the int8 recipe: far more loss than int8 in PyTorch has
    wrong = artifacts.copy(fmt, tmp_path / "claims-int8", recipe, debug=fmt == "pte")
    m = json.loads((wrong / "manifest.json").read_text())
    m["recipe"], m["job"]["recipe"] = resolve("int8").to_dict(), "int8"
    # a calibration record too, so the label passes lint and only parity can tell
    m["quantization"]["calibration_sha256"] = "0" * 64
    (wrong / "manifest.json").write_text(json.dumps(m))
    r = verify_artifact(wrong, plan).report
    assert not r["pass"] and any("mean KL to fp32" in f for f in r["failures"]), r["against_fp32"]
