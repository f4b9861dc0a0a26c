"""A checkpoint's own codes: decoded exactly, resolved per tensor, refused where a format cannot
store them, and carried bit for bit into the artifact."""

import numpy as np
import pytest

from gemma_export import backends, pipeline
from gemma_export.errors import CheckpointError, ConfigError, UnsupportedError
from gemma_export.gemma3 import family
from gemma_export.loading import ModelSpec
from gemma_export.quant import source
from gemma_export.quant.recipes import PRESETS, Scheme
from helpers import T, tiny_gguf

SIMPLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@pytest.mark.parametrize("kind", SIMPLE)
def test_codes_reproduce_gguf_dequantization(kind):
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 128)) * rng.uniform(0.01, 2, (48, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block (scale 0)
    w[5, 32:64] = 0.25  # a constant block (scale 0 for the types with a minimum)
    data = quantize(w, gguf.GGMLQuantizationType[kind])
    got = source.decode(data, kind, 48, 128)
    spec = source.KINDS[kind]
    want = dequantize(data, gguf.GGMLQuantizationType[kind])
    assert got.codes.dtype == np.int8 and got.scale.shape == (48, 128 // spec.block)
    lo, hi = -spec.levels // 2, spec.levels // 2 - 1
    assert got.codes.min() >= lo and got.codes.max() <= hi
    assert len(np.unique(got.codes)) > spec.levels // 2  # the codes use the type's range
    diff = np.abs(source.dequantize_codes(got.codes, got.scale, got.zero) - want).max()
    if spec.symmetric:
        assert got.zero is None and diff == 0.0
    else:
        assert got.zero is not None and diff <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0", "Q5_0"])
def test_real_k_quant_tensors_decode(kind):
    """The bundled Q4_K_M's own K-quant blocks (gguf cannot make them), one tensor per type."""
    from gguf.quants import dequantize

    from gemma_export.loading import bundled_gguf
    from gemma_export.loading.checkpoints import _open_gguf

    t = next(t for t in _open_gguf(bundled_gguf()).tensors if t.tensor_type.name == kind and t.name.startswith("blk."))
    inp, rows = (int(d) for d in t.shape)
    got = source.decode(t.data, kind, rows, inp)
    want = np.asarray(dequantize(t.data, t.tensor_type)).reshape(rows, inp)
    block = source.KINDS[kind].block
    assert got.scale.shape == (rows, inp // block)
    back = source.dequantize_codes(got.codes, got.scale, got.zero)
    assert np.abs(back - want).max() <= (0 if got.zero is None else 1e-6 * np.abs(want).max())


def test_a_corrupt_block_is_caught():
    import gguf
    from gguf.quants import quantize

    data = quantize(np.ones((2, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(Exception):
        source.decode(data[:, :20], "Q8_0", 2, 32)  # blocks cut short


def test_concrete_recipe_per_tensor(tiny):
    modules = source.modules(tiny.cfg)
    types = {m: "Q4_K" for m in modules} | {family.TABLE: "Q8_0", modules[1]: "F16"}
    r = source.concrete(PRESETS["source"], types, modules)
    assert [rule.pattern for rule in r.rules] == modules
    assert r.scheme_for(family.TABLE) == Scheme(8, "block", 32, "float", "source")
    assert r.scheme_for(modules[2]) == Scheme(4, "block", 32, "float", "source", symmetric=False)
    assert r.scheme_for(modules[1]) == Scheme(8, "channel", 0, "float", "rtn")  # the recipe's fallback
    assert source.concrete(r, types, modules) == r  # idempotent: a manifest's recipe resolves to itself
    with pytest.raises(ConfigError, match="Q2_K"):
        source.concrete(PRESETS["source"], {**types, modules[3]: "Q2_K"}, modules)


def test_zero_points_only_from_sources():
    with pytest.raises(ConfigError, match="zero points"):
        Scheme(4, "block", 32, symmetric=False)
    with pytest.raises(ConfigError, match="block size"):
        Scheme(8, "block", 16)
    assert Scheme(8, "block", 16, algorithm="source").label == "w8b16-float-source"


@pytest.mark.parametrize("fmt, scheme, refused", [
    ("onnx", Scheme(4, "block", 32, "float", "source", symmetric=False), None),
    ("onnx", Scheme(8, "block", 32, "float", "source", symmetric=False), "zero points"),
    ("onnx", Scheme(8, "block", 16, "float", "source"), None),
    ("pte", Scheme(8, "block", 32, "int8-dynamic", "source"), "block-wise int8"),
    ("pte", Scheme(4, "block", 32, "int8-dynamic", "source", symmetric=False), "zero points"),
    ("tflite", Scheme(8, "block", 16, "int8-dynamic", "source"), "a float embed_tokens"),
    ("pte", Scheme(4, "block", 32, "int8-dynamic", "source"), None),
])
def test_formats_refuse_what_they_cannot_store(fmt, scheme, refused):
    from gemma_export.quant.recipes import QuantRecipe, Rule

    why = backends.get(fmt).lowering.refusal(QuantRecipe("r", (Rule("layers.0.mlp.up_proj", scheme),)))
    assert (why is None) if refused is None else (refused in why)


def test_random_weights_hold_no_codes(tmp_path):
    from helpers import TINY

    with pytest.raises(ConfigError, match="random weights"):
        pipeline.export(pipeline.ExportJob.single(TINY, "onnx", tmp_path / "a", recipe="source"))
    assert not (tmp_path / "a").exists()


def _codes_in(artifact, fmt):
    from gemma_export.artifact import read_manifest

    m = read_manifest(artifact)
    return backends.get(fmt).read_codes(artifact, m)


def _as_set(arrays):
    return {(a.shape, a.tobytes()) for a in arrays}


KINDS = {"attn_q": "Q4_1", "attn_k": "Q5_0", "attn_v": "Q8_0", "ffn_up": "Q4_1"}  # others Q4_0


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The tiny model as a GGUF of four block types (made once: writing and reading a GGUF with
    the full vocabulary takes a while)."""
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", lambda name, arr: next(
        (k for part, k in KINDS.items() if f".{part}." in name), "Q4_0"))


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "q4_0.gguf", lambda name, arr: "Q4_0")


def source_cfg(path):
    from gemma_export.loading import read_config

    return read_config(str(path))


def test_mixed_types_kept_bit_for_bit_in_onnx(tmp_path, mixed):
    """Q4_0, Q4_1 (zero points), Q5_0 and Q8_0 tensors: the ONNX artifact holds the same codes,
    and it says what the PyTorch model with those codes says."""
    out = tmp_path / "onnx"
    pipeline.export(pipeline.ExportJob.single(ModelSpec(str(mixed), max_context=256), "onnx", out, recipe="source",
                                              prefill_len=T))
    want = source.read_codes(mixed, source.modules(source_cfg(mixed)))
    assert {c.kind for c in want.values()} == {"Q4_0", "Q4_1", "Q5_0", "Q8_0"}
    stored = _codes_in(out, "onnx")
    # a fused q/k/v or gate/up MatMulNBits is split back into its weights' rows by read_codes
    assert _as_set(c.codes for c in want.values()) <= _as_set(stored)
    from gemma_export import api
    from gemma_export.verification.check import VerifyPlan
    from helpers import TEXT

    v = api.verify(out, plan=VerifyPlan(TEXT, positions=96, new_tokens=8))
    r = v.report
    assert v.passed and r["top1_agreement"] == 1.0 and r["mean_kl"] <= 1e-6, r["failures"]
    assert r["greedy_equal"]


def test_mixed_types_refused_by_pte_before_work(tmp_path, mixed):
    with pytest.raises(UnsupportedError, match="cannot lower int4 codes with zero points"):
        pipeline.export(pipeline.ExportJob.single(ModelSpec(str(mixed)), "pte", tmp_path / "p", recipe="source-dynamic"))
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pte", "tflite"])
def test_q4_0_codes_kept_in_xnnpack_formats(tmp_path, fmt, q4_0):
    out = tmp_path / fmt
    # without the debug methods: ExecuTorch lowers each method on its own (verify steps `forward`)
    pipeline.export(pipeline.ExportJob.single(ModelSpec(str(q4_0), max_context=256), fmt, out,
                                              recipe="source-dynamic", prefill_len=T, debug_outputs=False))
    recipe = source.resolve_for(PRESETS["source-dynamic"], str(q4_0), source_cfg(q4_0))
    want = source.read_codes(q4_0, source.modules(source_cfg(q4_0)))
    held = {n: source.as_stored(c, recipe.scheme_for(n)) for n, c in want.items()}
    # XNNPACK's positive scales: a negative-scale block's sign moves into its codes, its -8 becomes 7
    for n, c in want.items():
        h, neg = held[n], np.repeat(c.scale < 0, 32, axis=1)
        assert np.all(h.scale > 0) and np.array_equal(h.scale, np.abs(h.scale))
        assert np.array_equal(h.codes[~neg], c.codes[~neg])
        assert np.array_equal(h.codes[neg], np.minimum(-c.codes[neg].astype(np.int16), 7))
    assert _as_set(c.codes for c in held.values()) <= _as_set(_codes_in(out, fmt))
    from gemma_export import api
    from gemma_export.verification.check import VerifyPlan
    from helpers import TEXT

    v = api.verify(out, plan=VerifyPlan(TEXT, positions=64, new_tokens=8))  # loads and runs in its runtime
    assert v.passed, v.report["failures"]


def test_inspect_lists_types_and_what_each_format_does(mixed):
    from helpers import cli

    r = cli("inspect", mixed, "--recipe", "source", "--json")
    assert r.exit_code == 0, r.output
    import json

    q = json.loads(r.output)["quantization"]
    rows = {row["tensor"]: row for row in q["tensors"]}
    up = rows["layers.0.mlp.up_proj"]
    assert up["source"] == "Q4_1" and up["recipe"] == "w4b32-asym-float-source"
    assert up["formats"]["onnx"] == "exact" and up["formats"]["pte"].startswith("refused")
    assert q["summary"] == {"Q4_0 -> w4b32-float-source": 7, "Q4_1 -> w4b32-asym-float-source": 4,
                            "Q5_0 -> w8b32-float-source": 2, "Q8_0 -> w8b32-float-source": 2}
    assert q["formats"]["onnx"] == "lowers the recipe" and q["formats"]["pte"].startswith("refused")
    text = cli("inspect", mixed, "--recipe", "source-dynamic").output
    assert "scales rounded to bf16" in text


def test_a_type_gguf_cannot_dequantize_is_named(mixed, monkeypatch):
    import gguf

    from gemma_export.loading.checkpoints import read_gguf

    real = gguf.quants.dequantize

    def partial(data, qtype):
        if qtype == gguf.GGMLQuantizationType.Q5_0:
            raise NotImplementedError("Dequantization for Q5_0 is not yet implemented")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", partial)
    _, tensors = read_gguf(mixed)
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_k\.weight is stored as Q5_0, which the gguf package"):
        for _ in tensors:
            pass


def test_the_manifest_records_what_the_source_held(tmp_path, mixed):
    from gemma_export.loading import Tokenizer, load
    from gemma_export.quant.quantize import quantize_model

    loaded = load(ModelSpec(str(mixed)))
    info = quantize_model(loaded.model, "source-dynamic", Tokenizer(loaded.tokenizer_path),
                          checkpoint=loaded.checkpoint).to_dict()["source"]
    assert info["checkpoint"] == "mixed.gguf"
    assert info["types"]["Q4_0 -> w4b32-int8-dynamic-source"] == 7
    codes = source.read_codes(mixed, source.modules(loaded.config))
    negative_eights = sum(int(np.sum((c.codes == -8) & np.repeat(c.scale < 0, 32, axis=1)))
                          for c in codes.values() if c.kind == "Q4_0")
    assert info["values_not_kept"] == negative_eights > 0


def test_weights_on_the_q4_0_grid_are_kept_from_a_safetensors_folder(tmp_path, tiny):
    """A QAT-style checkpoint: float weights exactly on a Q4_0 grid are found by checking and
    kept without rounding; an off-grid weight (one value moved by an ulp) and the table fall back."""
    import copy

    import gguf
    import torch
    from gguf.quants import dequantize, quantize

    from helpers import write_hf_folder

    model = copy.deepcopy(tiny)
    snapped = {}
    with torch.no_grad():
        for name in source.modules(model.cfg)[1:]:
            w = model.get_submodule(name).weight
            q = quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
            w.copy_(torch.from_numpy(dequantize(q, gguf.GGMLQuantizationType.Q4_0).reshape(w.shape)))
            snapped[name] = source.decode(q, "Q4_0", *w.shape)
        off = model.layers[1].mlp.down_proj.weight
        off[0, 0] = float(np.nextafter(np.float32(off[0, 0].item()), np.float32(np.inf)))
    folder = write_hf_folder(model, tmp_path / "qat")
    types = source.tensor_types(folder)
    assert types[family.TABLE] == "F32" and types["layers.1.mlp.down_proj"] == "F32"
    assert sum(t == source.GRID for t in types.values()) == 13
    codes = source.read_codes(folder, [n for n, t in types.items() if t == source.GRID])
    for name, c in codes.items():
        assert np.array_equal(c.codes, snapped[name].codes) and np.array_equal(c.scale, snapped[name].scale)
    out = tmp_path / "onnx"
    pipeline.export(pipeline.ExportJob.single(ModelSpec(str(folder), max_context=256), "onnx", out, recipe="source",
                                              prefill_len=T))
    assert _as_set(c.codes for c in codes.values()) <= _as_set(_codes_in(out, "onnx"))
    from gemma_export.artifact import read_manifest

    kept = read_manifest(out).quantization["source"]["types"]
    assert kept == {"F32 -> w8pc-float-rtn": 2, "Q4_0-grid -> w4b32-float-source": 13}
