"""Figures computed from a config alone: parameters, weight bytes, window-sized KV cache bytes."""

from gemma_export.gemma3.config import preset
from gemma_export.quant.recipes import resolve
from gemma_export.sizes import artifact_bytes, format_report, kv_cache_bytes, report


def test_window_cache_is_under_30_percent_for_1b_at_4096():
    r = report(preset("gemma3-1b"), 4096)
    assert r["kv_cache"]["window_over_full"] <= 0.30
    # 22 local layers x 512 + 4 global x 4096 positions, K and V, 256 dims, fp32
    assert kv_cache_bytes(preset("gemma3-1b"), 4096, True) == (22 * 512 + 4 * 4096) * 2 * 256 * 4


def test_text_report_names_the_layer_pattern():
    text = format_report(report(preset("gemma3-4b"), 131_072))
    assert "34 (29 local, window 1024; 5 global)" in text and "window-sized" in text


def test_an_onnx_image_export_needs_disk_for_the_embedding_graphs_table():
    cfg, recipe = preset("gemma3-4b"), resolve("int4-b32-rtn")
    extra = artifact_bytes(cfg, recipe, "onnx", images=True) - artifact_bytes(cfg, recipe, "onnx")
    assert abs(extra - 262_208 * 2560 * (0.5 + 0.07)) <= 2  # the int4 table with its scales
    assert artifact_bytes(cfg, recipe, "pte", images=True) == artifact_bytes(cfg, recipe, "pte")


def test_int8_kv_caches_of_the_4b_at_128k_are_under_30_percent_of_fp32():
    cfg = preset("gemma3-4b")
    fp32, int8 = (report(cfg, 131_072, d)["kv_cache"] for d in ("float32", "int8"))
    assert int8["window_sized_bytes"] / fp32["window_sized_bytes"] <= 0.30
    # per token and KV head: 256 int8 codes, a float32 scale and an int8 zero point; K and V
    assert int8["bytes_per_token"] == 5 * 2 * 4 * (256 + 5) and fp32["bytes_per_token"] == 5 * 2 * 4 * 256 * 4
    assert "per token" in format_report(report(cfg, 131_072, "int8"))
