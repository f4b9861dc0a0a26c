"""verify_artifact and verify_build: every artifact against its reference (loaded once per model),
one table, the formats against each other; eval against fp32."""

import json

import numpy as np
import pytest

import gemma_export.verification.check as check_mod
from gemma_export.api import DEFAULT_TEXT
from gemma_export.verification.check import EvalPlan, VerifyPlan, evaluate, verify_artifact, verify_build
from gemma_export.loading import ModelSpec
from helpers import cli, resign

FAST = ["--positions", "40", "--new-tokens", "6"]


@pytest.fixture(scope="module")
def build(artifacts, tmp_path_factory):
    """Two artifacts of one model: the ONNX graph with and without its debug output."""
    root = tmp_path_factory.mktemp("build")
    artifacts.copy("onnx", root / "onnx" / "fp32")
    artifacts.copy("onnx", root / "onnx-release" / "fp32", debug=False)
    return root


def plant_weight_fault(folder):
    data = folder / "model.onnx.data"
    w = np.fromfile(data, dtype=np.float32)
    w[: 1 << 20] *= 1.5
    w.tofile(data)
    resign(folder)


def test_one_artifact_passes_with_a_report(artifacts):
    v = verify_artifact(artifacts.get("onnx"), VerifyPlan(DEFAULT_TEXT, positions=48, new_tokens=8))
    r = v.report
    assert v.passed and r["pass"] and r["judged"] == "against the reference" and r["window"] == 16
    assert r["positions"] == 48 and r["greedy_reference"] == r["greedy_test"]
    assert {c["metric"] for c in r["checks"]} == {"top1_agreement", "top5_overlap", "mean_kl"}
    v.raise_if_failed()


def test_every_artifact_verified_with_one_reference_table_json_and_report(build, tmp_path, monkeypatch):
    calls = []
    real = check_mod.reference_for
    monkeypatch.setattr(check_mod, "reference_for", lambda *a, **k: calls.append(a) or real(*a, **k))
    rep = tmp_path / "rep"
    res = cli("verify", build, "--all", "--report", rep, *FAST)
    assert res.exit_code == 0, res.output
    assert len(calls) == 1  # both artifacts come from the same model
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["artifact", "format", "recipe"]
    assert lines[1].startswith("onnx/fp32") and lines[1].endswith("PASS")
    assert lines[2].startswith("onnx-release/fp32") and lines[2].endswith("PASS")
    assert any(line.startswith("onnx/fp32 vs onnx-release/fp32") for line in lines)
    assert lines[-1] == f"PASS all 2 artifacts in {build}"
    data = json.loads((rep / "report.json").read_text())
    assert data["pass"] and [r["artifact"] for r in data["artifacts"]] == [str(build / "onnx" / "fp32"),
                                                                           str(build / "onnx-release" / "fp32")]
    (pair,) = data["pairwise"]
    assert pair["formats"] == "onnx/fp32 vs onnx/fp32" and pair["positions"] == 40
    # the release artifact is scored token by token through its decoder, the debug one through its
    # score graph: the same weights in other kernel shapes, equal up to float rounding
    assert pair["top1_agreement"] == 1.0 and pair["mean_kl"] < 1e-9
    assert "onnx/fp32 vs onnx-release/fp32" in (rep / "report.md").read_text()
    assert (rep / "onnx__fp32" / "parity.png").is_file() and (rep / "onnx-release__fp32" / "report.md").is_file()


@pytest.mark.slow
def test_every_format_against_the_others(artifacts, tmp_path):
    for fmt in ("onnx", "tflite", "pte"):
        artifacts.copy(fmt, tmp_path / fmt)
    result = verify_build(tmp_path, VerifyPlan(DEFAULT_TEXT, positions=40, new_tokens=6))
    assert result.passed, [r.get("failures") for r in result.rows]
    pairs = {p["formats"]: p for p in result.pairwise}
    assert set(pairs) == {"onnx/fp32 vs pte/fp32", "onnx/fp32 vs tflite/fp32", "pte/fp32 vs tflite/fp32"}
    assert all(p["top1_agreement"] == 1.0 and p["mean_kl"] < 1e-6 for p in pairs.values()), pairs


def test_build_json_on_stdout(build):
    res = cli("verify", build, "--all", "--json", "--positions", "20", "--new-tokens", "2")
    data = json.loads(res.stdout)  # stdout is one JSON document
    assert res.exit_code == 0 and data["pass"] and len(data["artifacts"]) == 2 and data["pairwise"]


def test_one_faulty_artifact_fails_the_build_with_exit_3(build, tmp_path):
    import shutil

    bad = tmp_path / "build"
    shutil.copytree(build, bad)
    plant_weight_fault(bad / "onnx" / "fp32")
    res = cli("verify", bad, "--all", "--report", tmp_path / "rep", *FAST)
    assert res.exit_code == 3, res.output
    assert f"parity FAILED for 1 of 2 artifacts: {bad / 'onnx' / 'fp32'}" in res.output
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    rows = data["artifacts"]
    assert [r["pass"] for r in rows] == [False, True]
    assert any(f.startswith("mean_kl") for f in rows[0]["failures"])
    (pair,) = data["pairwise"]
    assert pair["mean_kl"] > 1e-4  # the two artifacts disagree with each other too


def test_unreadable_artifact_is_an_error_row_and_exit_1(build, tmp_path):
    import shutil

    bad = tmp_path / "build"
    shutil.copytree(build, bad)
    (bad / "onnx-release" / "fp32" / "model.onnx").write_bytes(b"")
    res = cli("verify", bad, "--all", *FAST)
    assert res.exit_code == 1, res.output
    assert "ERROR:" in res.output and "truncated or replaced" in res.output
    assert "1 artifact(s) could not be verified" in res.output


def test_empty_build_folder(tmp_path):
    res = cli("verify", tmp_path, "--all")
    assert res.exit_code == 1 and "no artifact folders" in res.output


def test_eval_of_an_artifact_is_against_fp32(artifacts):
    art = ModelSpec(str(artifacts.get("onnx")))
    r = evaluate(art, "fp32", 16, EvalPlan(DEFAULT_TEXT, positions=40))
    assert r["positions"] == 40 and r["mean_kl"] < 1e-8 and r["top1_agreement"] == 1.0
    assert r["perplexity"] == pytest.approx(r["perplexity_reference"], rel=1e-5)
    only = evaluate(art, "fp32", 16, EvalPlan(DEFAULT_TEXT, 40, with_reference=False))
    assert only["perplexity"] == pytest.approx(r["perplexity"], rel=1e-4) and "mean_kl" not in only


class Recorder:
    """A progress callback that keeps the stage lines and the position counts it is given."""

    def __init__(self):
        self.lines, self.counts = [], []

    def __call__(self, msg):
        self.lines.append(msg)

    def step(self, done, total, figures):
        self.counts.append((done, total, figures()))


def test_verify_and_eval_report_progress_as_they_go(artifacts):
    rec = Recorder()
    verify_artifact(artifacts.get("onnx"), VerifyPlan(DEFAULT_TEXT, positions=40, new_tokens=4), progress=rec)
    assert any(line.startswith("teacher-forced 40 positions in ") and "top-1" in line for line in rec.lines), rec.lines
    done = [d for d, _, _ in rec.counts]
    assert done == sorted(done) and done[-1] == 40 and all(t == 40 for _, t, _ in rec.counts)
    assert {"top1", "mean_kl", "perplexity"} <= set(rec.counts[-1][2])
    rec = Recorder()
    evaluate(ModelSpec(str(artifacts.get("onnx"))), "fp32", 16, EvalPlan(DEFAULT_TEXT, positions=30), rec)
    assert rec.counts[-1][:2] == (30, 30) and any("teacher-forcing 30 positions" in line for line in rec.lines)


def test_a_log_without_a_terminal_gets_stage_lines_only(artifacts):
    res = cli("verify", artifacts.get("onnx"), *FAST)
    assert res.exit_code == 0, res.output
    assert "teacher-forced 40 positions in " in res.stderr and "\r" not in res.stderr
