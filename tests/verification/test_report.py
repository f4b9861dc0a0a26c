"""`verify --report DIR`: report.md, report.json and a PNG of per-position KL and top-1 agreement."""

import json

import numpy as np

from gemma_export.verification.report import markdown, plot, summary_lines, window_split
from helpers import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def verify(*args):
    return cli("verify", *args, "--positions", "48", "--new-tokens", "8")


def test_report_folder_for_a_passing_artifact(artifacts, tmp_path):
    rep = tmp_path / "rep"
    res = verify(artifacts.get("onnx"), "--report", rep)
    assert res.exit_code == 0, res.output
    md = (rep / "report.md").read_text()
    assert md.startswith("# Parity report: onnx artifact") and "**PASS**" in md
    for part in ("| Format | onnx |", "| Sliding window | 16 |", "| top1_agreement >= | 0.999 |",
                 "| 0..15 | inside the window | 16 |", "| 16..47 | past the window | 32 |",
                 "8 tokens; the first 8 agree (all).", "![per-position KL"):
        assert part in md, part
    png = (rep / "parity.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000
    report = json.loads((rep / "report.json").read_text())
    assert report["pass"] and report["window"] == 16 and report["greedy_reference"] == report["greedy_test"]


def test_report_folder_for_a_failing_artifact(artifacts, tmp_path):
    rep = tmp_path / "rep"
    res = verify(artifacts.get("onnx"), "--report", rep, "--min-top1", "1.5")
    assert res.exit_code == 3
    assert "parity FAILED: top1_agreement = 1, needs >= 1.5" in res.output
    assert "threshold overrides applied: top1_agreement >= 1.5" in res.output
    md = (rep / "report.md").read_text()
    assert "**FAIL**: top1_agreement = 1, needs >= 1.5" in md and "| top1_agreement >= | 1.5 | 1 | override | **no** |" in md
    assert (rep / "parity.png").read_bytes().startswith(PNG_MAGIC)


def test_json_is_the_whole_report_on_stdout(artifacts):
    res = verify(artifacts.get("onnx"), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["pass"] and report["format"] == "onnx" and report["positions"] == 48


def synthetic(n=40, window=16):
    rng = np.random.default_rng(0)
    kl = np.where(np.arange(n) < window, 1e-12, 1e-3) * rng.uniform(0.5, 2, n)
    kl[3] = 0.0
    top1 = np.ones(n)
    top1[[20, 30]] = 0.0
    return {"top1": top1.tolist(), "top5": [1.0] * n, "kl": kl.tolist(), "cosine": [0.99] * n,
            "max_abs": [0.5] * n}


def test_window_split_separates_the_two_sides():
    inside, past = window_split(synthetic(), 16)
    assert (inside["range"], inside["positions"], inside["top1_agreement"]) == ("0..15", 16, 1.0)
    assert (past["range"], past["positions"], past["top1_agreement"]) == ("16..39", 24, 22 / 24)
    assert inside["max_kl"] < 1e-11 < 1e-4 < past["mean_kl"]


def test_markdown_lists_disagreements_and_greedy_divergence():
    pp = synthetic()
    check = {"label": "artifact", "metric": "top1_agreement", "op": ">=", "limit": 0.999, "source": "recipe",
             "recipe": None, "measured": 0.95, "ok": False}
    report = {"artifact": "a", "format": "tflite", "recipe": "fp32", "reference": "ref", "text": "t", "window": 16,
              "positions": 40, "rule": {"relative": False}, "judged": "against the reference", "checks": [check],
              "pass": False, "failures": ["x"], "top1_agreement": 0.95, "greedy_tokens": 3,
              "greedy_equal_prefix": 1, "greedy_equal": False, "greedy_reference": [1, 2, 3], "greedy_test": [1, 5, 6]}
    md = markdown(report, pp)
    assert "Top-1 disagrees at 2 positions; first: 20, 30." in md
    assert "3 tokens; the first 1 agree." in md and "| tflite | 1 5 6 |" in md
    assert "| top1_agreement >= | 0.999 | 0.95 | recipe | **no** |" in md
    assert summary_lines(report)[:1] == ["positions              40"]


def test_plot_draws_zero_kl_and_misses(tmp_path):
    path = plot(tmp_path / "p.png", synthetic(), 16, "synthetic", {"top1_agreement": 0.999, "mean_kl": 1e-4})
    assert path.read_bytes().startswith(PNG_MAGIC)
