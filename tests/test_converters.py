"""Every format on the tiny model: export, run in the format's own runtime, match PyTorch past the window."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gemma_export.cli import cli
from gemma_export.errors import ArtifactError, ConfigError, UnsupportedError
from gemma_export.loading import ModelSpec
from gemma_export.metrics import Thresholds
from gemma_export.package import ExportRequest, export, open_artifact, read_manifest
from gemma_export.session import TorchSession
from gemma_export.verify import parity

FORMATS = ["onnx", "tflite", "pte"]
T, CTX = 16, 256
TINY = ModelSpec("tiny", random_weights=True, seed=0, max_context=CTX)
# fp32 artifacts must agree with eager PyTorch to float rounding
FP32 = Thresholds(min_top1=1.0, min_top5=1.0, max_mean_kl=1e-8, max_abs_diff=1e-3)


@pytest.fixture(scope="module", params=FORMATS)
def artifact(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "art"
    export(TINY, ExportRequest(request.param, prefill_len=T, max_context=CTX), out)
    return request.param, out


def test_manifest_describes_the_artifact(artifact):
    fmt, out = artifact
    m = read_manifest(out)
    assert m["format"] == fmt and m["prefill_len"] == T and m["max_context"] == CTX and m["window"] == 16
    assert m["cache_lengths"] == [16, CTX]
    assert set(m["files"]) >= {"tokenizer.json", m["program"]["file"]}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert "torch" in m["versions"] and m["model"]["config"]["name"] == "tiny"
    names = {e["name"] for ep in m["entry_points"].values() for e in ep["inputs"]}
    assert {"tokens", "pos"} <= names


def test_artifact_matches_pytorch_past_the_window(artifact, tiny):
    _, out = artifact
    opened = open_artifact(out, hashes=True)
    ids = np.random.default_rng(1).integers(3, 262_144, size=150).tolist()  # > 9x the window
    prompt = ids[:20]
    res = parity(TorchSession(tiny, prefill_len=T), opened.session, ids, prompt, 32)
    assert res.teacher_forced.n == 150
    assert not res.failures(FP32), res.summary()


@pytest.mark.parametrize("artifact", ["pte"], indirect=True)
def test_pte_stores_the_table_once_and_no_cache_state(artifact):
    """The .pte carries no zero-filled cache (its `reset` method zeroes the shared buffers), and
    the tied fp32 table is one copy in model.ptd, read by the gather and by XNNPACK's head."""
    fmt, out = artifact
    from executorch.exir._serialize._program import deserialize_pte_binary

    m = read_manifest(out)
    assert m["program"]["reset_method"] == "reset" and m["program"]["external_data"] == "model.ptd"
    pte = deserialize_pte_binary((out / "model.pte").read_bytes())
    assert not pte.mutable_data
    table = 262_144 * 64 * 4  # tiny's fp32 token table
    assert table <= (out / "model.ptd").stat().st_size < 1.05 * table


@pytest.mark.parametrize("artifact", ["pte"], indirect=True)
def test_pte_reset_zeroes_the_shared_cache(artifact):
    fmt, out = artifact
    s = open_artifact(out).session
    s.prefill([2, 900, 1000], 0)
    kept = s.decode(5, 1)  # decode at position 1 reads slot 0 written by the prefill
    s.prefill([2, 900, 1000], 0)
    s.reset()
    zeroed = s.decode(5, 1)  # slot 0 now holds zeros: a different result proves reset reached the cache
    assert not np.allclose(kept, zeroed)
    s.reset()
    fresh = s.prefill([2, 900, 1000], 0)
    s.prefill([7, 7], 0)
    s.reset()
    assert np.array_equal(s.prefill([2, 900, 1000], 0), fresh)


def test_generate_from_artifact_cli(artifact):
    _, out = artifact
    args = ["generate", str(out), "--prompt", "Hello", "--max-new-tokens", "4", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["tokens"]) == 4


def test_truncated_model_file_is_reported(artifact, tmp_path):
    import shutil

    _, out = artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    m = read_manifest(copy)
    f = copy / m["program"]["file"]
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        open_artifact(copy)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import converters.onnx as conv

    def boom(*a, **k):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(conv, "export", boom)
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="planted"):
        export(TINY, ExportRequest("onnx", prefill_len=T, max_context=CTX), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_not_overwritten(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        export(TINY, ExportRequest("onnx", prefill_len=T, max_context=CTX), out)
    with pytest.raises(ConfigError, match="not an artifact folder"):
        export(TINY, ExportRequest("onnx", prefill_len=T, max_context=CTX), out, force=True)
    assert (out / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_recipe_refused_before_work(fmt, tmp_path):
    from gemma_export.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown recipe 'nonsense'"):
        export(TINY, ExportRequest(fmt, prefill_len=T, max_context=CTX, recipe="nonsense"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_cli_reports_progress_and_summary(tmp_path):
    out = tmp_path / "cli-onnx"
    res = CliRunner().invoke(cli, ["export", "tiny", "--random-weights", "--format", "onnx", "--out", str(out),
                                   "--prefill-len", "8", "--max-context", "64"])
    assert res.exit_code == 0, res.output
    assert "onnx artifact" in res.output and (out / "manifest.json").is_file()


def test_locate_names_the_planted_faulty_layer(artifact, tiny, tmp_path):
    import shutil

    from faults import plant
    from gemma_export.verify import locate

    fmt, out = artifact
    ids = list(range(1000, 1016))
    ref = TorchSession(tiny, prefill_len=T)
    clean = locate(ref, open_artifact(out).session, ids)
    assert clean["first_diverging"] is None, clean
    assert max(clean["relative_error"].values()) < 1e-4
    bad = tmp_path / "faulty"
    shutil.copytree(out, bad)
    where = plant(bad, tiny.layers[1].mlp.down_proj.weight.detach().numpy())
    found = locate(ref, open_artifact(bad, hashes=True).session, ids)
    assert found["first_diverging"] == "layer 1", (where, found)
    assert found["relative_error"]["layer 0"] < 1e-4


def test_verify_cli_locate_names_the_faulty_layer(tmp_path, tiny):
    """`verify --locate` on an artifact with a planted fault: exit 3, and the layer is named."""
    from faults import plant

    out = tmp_path / "onnx"
    export(TINY, ExportRequest("onnx", prefill_len=T, max_context=CTX), out)
    plant(out, tiny.layers[0].self_attn.v_proj.weight.detach().numpy(), factor=-2.0)
    report = tmp_path / "report"
    res = CliRunner().invoke(cli, ["verify", str(out), "--positions", "60", "--new-tokens", "4", "--locate",
                                   "--report", str(report)])
    assert res.exit_code == 3, res.output
    assert "first diverging: layer 0" in res.output
    assert "**layer 0**" in (report / "report.md").read_text()


def _unsupported_pairs():
    from converters import supported_presets
    from gemma_export.recipes import PRESETS

    pairs = [(f, r) for f in FORMATS for r in sorted(PRESETS) if r not in supported_presets(f)]
    assert ("tflite", "int8-weights") in pairs and ("pte", "int8-weights") in pairs
    return pairs


@pytest.mark.parametrize("fmt,recipe", _unsupported_pairs())
def test_unsupported_format_recipe_pairs_are_refused_with_the_typed_error(fmt, recipe, tmp_path):
    """The other half of the contract: supported pairs export and pass parity (above)."""
    with pytest.raises(UnsupportedError, match=f"format {fmt} does not support recipe"):
        export(TINY, ExportRequest(fmt, prefill_len=T, max_context=CTX, recipe=recipe), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_recipe_files_are_judged_by_content(tmp_path):
    """A recipe file is refused for what it asks (static activations on XNNPACK), not for its name."""
    from gemma_export.recipes import PRESETS, QuantRecipe, Rule, Scheme

    rules = (Rule("layers.*", Scheme(8, activations="int8-static")),)
    path = tmp_path / "static.toml"
    path.write_text(QuantRecipe("my-static", rules).to_toml())
    with pytest.raises(UnsupportedError, match="cannot lower int8-static activations"):
        export(TINY, ExportRequest("pte", prefill_len=T, max_context=CTX, recipe=str(path)), tmp_path / "x")
    # the same content under a preset's name is refused as well
    path.write_text(QuantRecipe("int8", rules).to_toml())
    with pytest.raises(UnsupportedError, match="int8-static"):
        export(TINY, ExportRequest("pte", prefill_len=T, max_context=CTX, recipe=str(path)), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    mixed = (Rule("embed_tokens", Scheme(8, activations="int8-dynamic")),
             Rule("layers.*", Scheme(4, "block", 32, activations="int8-dynamic")))
    path.write_text(QuantRecipe("mixed", mixed).to_toml())
    with pytest.raises(UnsupportedError, match="mix of weight schemes"):
        export(TINY, ExportRequest("tflite", prefill_len=T, max_context=CTX, recipe=str(path)), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert PRESETS["int8"].scheme_for("layers.0.mlp.up_proj").activations == "int8-dynamic"


def test_every_format_lowers_fp32_and_the_table_agrees_with_the_check():
    from converters import supported_presets, unsupported_reason
    from gemma_export.recipes import PRESETS

    for fmt in FORMATS:
        assert unsupported_reason(fmt, PRESETS["fp32"]) is None
        assert "fp32" in supported_presets(fmt)
        for name in supported_presets(fmt):
            assert unsupported_reason(fmt, PRESETS[name]) is None
