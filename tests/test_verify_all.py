"""`verify BUILD_DIR --all`: every artifact against its reference, one table, formats against each other."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import gemma_export.verify as verify_mod
from gemma_export.cli import cli, default_eval_text
from gemma_export.loading import ModelSpec
from gemma_export.package import ExportRequest, export, sha256_file
from gemma_export.report import VerifyPlan, verify_build

T, CTX = 16, 256
TINY = ModelSpec("tiny", random_weights=True, seed=0, max_context=CTX)
FAST = ["--positions", "40", "--new-tokens", "6"]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    for fmt in ("onnx", "tflite"):
        export(TINY, ExportRequest(fmt, prefill_len=T, max_context=CTX), root / fmt / "fp32")
    return root


def resign(folder):
    """Rewrite the manifest's sizes and hashes so only parity (not integrity) can catch a change."""
    m = json.loads((folder / "manifest.json").read_text())
    for name in m["files"]:
        m["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))


def plant_weight_fault(folder):
    data = folder / "model.onnx.data"
    w = np.fromfile(data, dtype=np.float32)
    w[: 1 << 20] *= 1.5
    w.tofile(data)
    resign(folder)


def test_every_artifact_verified_and_reference_loaded_once(build, monkeypatch):
    calls = []
    real = verify_mod.reference_for
    monkeypatch.setattr(verify_mod, "reference_for", lambda *a, **k: calls.append(a) or real(*a, **k))
    result = verify_build(build, VerifyPlan(default_eval_text(), positions=40, new_tokens=6))
    assert len(calls) == 1  # both artifacts come from the same model
    assert result["pass"] and [r["format"] for r in result["artifacts"]] == ["onnx", "tflite"]
    (pair,) = result["pairwise"]
    assert pair["formats"] == "onnx/fp32 vs tflite/fp32" and pair["positions"] == 40
    assert pair["top1_agreement"] == 1.0 and pair["mean_kl"] < 1e-8 and pair["max_abs_diff"] < 1e-3


def test_cli_table_json_and_report(build, tmp_path):
    js, rep = tmp_path / "all.json", tmp_path / "rep"
    res = CliRunner().invoke(cli, ["verify", str(build), "--all", "--json", str(js), "--report", str(rep), *FAST])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["artifact", "format", "recipe"]
    assert lines[1].startswith("onnx/fp32") and lines[1].endswith("PASS")
    assert lines[2].startswith("tflite/fp32") and lines[2].endswith("PASS")
    assert any(line.startswith("onnx/fp32 vs tflite/fp32") for line in lines)
    assert lines[-1] == f"PASS all 2 artifacts in {build}"
    data = json.loads(js.read_text())
    assert data["pass"] and len(data["artifacts"]) == 2 and len(data["pairwise"]) == 1
    assert "onnx/fp32 vs tflite/fp32" in (rep / "report.md").read_text()
    assert (rep / "onnx__fp32" / "parity.png").is_file() and (rep / "tflite__fp32" / "report.md").is_file()


def test_one_faulty_artifact_fails_the_build_with_exit_3(build, tmp_path):
    bad = tmp_path / "build"
    shutil.copytree(build, bad)
    plant_weight_fault(bad / "onnx" / "fp32")
    js = tmp_path / "all.json"
    res = CliRunner().invoke(cli, ["verify", str(bad), "--all", "--json", str(js), *FAST])
    assert res.exit_code == 3, res.output
    assert f"parity FAILED for 1 of 2 artifacts: {bad / 'onnx' / 'fp32'}" in res.output
    rows = {r["format"]: r for r in json.loads(js.read_text())["artifacts"]}
    assert not rows["onnx"]["pass"] and rows["tflite"]["pass"]
    assert any(f.startswith("mean_kl") for f in rows["onnx"]["failures"])
    (pair,) = json.loads(js.read_text())["pairwise"]
    assert pair["mean_kl"] > 1e-4  # the formats disagree with each other too


def test_unreadable_artifact_is_an_error_row_and_exit_1(build, tmp_path):
    bad = tmp_path / "build"
    shutil.copytree(build, bad)
    (bad / "tflite" / "fp32" / "model.tflite").write_bytes(b"")
    res = CliRunner().invoke(cli, ["verify", str(bad), "--all", *FAST])
    assert res.exit_code == 1, res.output
    assert "ERROR:" in res.output and "truncated or replaced" in res.output
    assert "1 artifact(s) could not be verified" in res.output


def test_empty_build_folder(tmp_path):
    res = CliRunner().invoke(cli, ["verify", str(tmp_path), "--all"])
    assert res.exit_code == 1 and "no artifact folders" in res.output
