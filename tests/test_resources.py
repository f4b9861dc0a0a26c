"""The export's estimate of its own peak memory, held to the bench's measurements, and the refusal
when the machine has less."""

import json
from pathlib import Path

import pytest

from gemma_export import pipeline, resources
from gemma_export.errors import ResourceError
from gemma_export.gemma3.config import preset
from gemma_export.pipeline import ExportJob
from gemma_export.quant.recipes import resolve
from helpers import T, TINY, cli

ROOT = Path(__file__).resolve().parent.parent
BENCH = {"270m": "gemma3-270m", "1b": "gemma3-1b"}


def _measured():
    for path in sorted((ROOT / "benchmarks" / "results").glob("export-*.json")):
        for row in json.loads(path.read_text())["results"]:
            if row.get("exit_code") == 0:
                yield row


def test_the_bench_has_measured_peaks_to_hold_the_estimate_to():
    rows = list(_measured())
    assert {r["model"] for r in rows} == {"270m", "1b"}
    assert {r["format"] for r in rows} == {"onnx", "tflite", "pte", "qnn"}


@pytest.mark.parametrize("row", list(_measured()),
                         ids=lambda r: f"{r['model']}-{r['format']}-{Path(r['recipe']).stem}"
                                       + ("-together" if "together" in r else ""))
def test_the_estimate_is_within_a_quarter_of_each_measured_peak(row, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe files are named relative to the repository
    formats = row.get("together", [row["format"]])
    est = resources.estimate(preset(BENCH[row["model"]]), resolve(row["recipe"]), formats, 0)
    assert abs(est.peak_memory / 2**30 / row["peak_rss_gib"] - 1) <= 0.25, (est.describe(), row["peak_rss_gib"])


def test_the_estimate_grows_with_the_model_and_the_formats():
    int4 = resolve("int4-b32-rtn")
    one = {m: resources.estimate(preset(m), int4, ["onnx"], 0).peak_memory for m in ("tiny", "gemma3-1b", "gemma3-4b")}
    assert one["tiny"] < one["gemma3-1b"] < one["gemma3-4b"]
    three = resources.estimate(preset("gemma3-1b"), int4, ["onnx", "tflite", "pte"], 0)
    assert three.peak_memory > max(resources.estimate(preset("gemma3-1b"), int4, [f], 0).peak_memory
                                   for f in ("onnx", "tflite", "pte"))
    mixed = resources.estimate(preset("gemma3-1b"), resolve("int4-mixed"), ["pte"], 0)
    assert mixed.stage == "measuring sensitivity"


def test_available_memory_is_read_from_this_machine():
    mem = resources.available_memory()
    assert mem is not None and 0 < mem < 2**50


def test_too_little_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 2**20)
    out = tmp_path / "sub" / "never"
    with pytest.raises(ResourceError, match=r"needs about [\d.]+ GiB of memory .* 0\.0 GiB available.*--force"):
        pipeline.export(ExportJob.single(TINY, "onnx", out, prefill_len=T))
    assert list(tmp_path.iterdir()) == []


def test_force_exports_anyway_and_the_build_record_keeps_the_estimate(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 2**20)
    out, record = tmp_path / "art", tmp_path / "build.json"
    pipeline.export(ExportJob.single(TINY, "onnx", out, prefill_len=T, force=True), record=record)
    est = json.loads(record.read_text())["estimate"]
    assert (out / "manifest.json").is_file()
    assert est["stage"] == "converting to onnx" and 0 < est["peak_memory_gib"] < 4 and est["disk_gib"] > 0


def test_the_cli_prints_the_estimate_and_refuses_the_4b_here_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 20 * 2**30)
    r = cli("export", "gemma3-4b", "--random-weights", "--format", "onnx", "--recipe", "int4-b32-rtn",
            "--out", tmp_path / "4b")
    assert r.exit_code == 1
    assert "estimated peak memory" in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "20.0 GiB available" in errors[0], r.output
    assert not (tmp_path / "4b").exists()


def test_a_vision_tower_adds_what_the_bench_measured_converting_it():
    """benchmarks.vision_export converts the 4B tower alone per format: its fixed part plus the
    tower multiple is held to each measured peak, and the 4B's estimate grows by the tower."""
    from gemma_export.gemma3.vision import vision_preset

    vc = vision_preset("gemma3-4b")
    rows = json.loads((ROOT / "benchmarks" / "results" / "vision-export-gemma3-4b.json").read_text())["rows"]
    for row in rows:
        f = resources.VISION[row["format"]]
        if row["format"] == "onnx":  # no image entry point: the export only holds the tower
            continue
        est = f.base + f.layers * resources.vision_gib(vc)
        assert abs(est / row["peak_rss_gib"] - 1) <= 0.25, (row["format"], est, row["peak_rss_gib"])
    int4 = resolve("int4-b32-rtn")
    text = resources.estimate(preset("gemma3-4b"), int4, ["pte"], 0).peak_memory
    both = resources.estimate(preset("gemma3-4b"), int4, ["pte"], 0, vc).peak_memory
    assert (both - text) / 2**30 == pytest.approx(resources.VISION["pte"].layers * resources.vision_gib(vc), rel=1e-3)
