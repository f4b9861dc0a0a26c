"""The command line: thin over the library; exit codes, one-line errors, --json everywhere."""

import json
import subprocess
import sys

from helpers import cli as run, plant


def test_help_does_not_import_torch():
    code = "import sys; from gemma_export.cli import cli; sys.argv=['gemma-export','--help']\n" \
           "try:\n    cli()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_models_lists_presets():
    res = run("models", "--json")
    assert res.exit_code == 0
    names = [r["name"] for r in json.loads(res.stdout)]
    assert {"gemma3-270m", "gemma3-1b", "gemma3-4b", "tiny"} <= set(names)


def test_inspect_1b_window_cache_fraction():
    res = run("inspect", "gemma3-1b", "--context", "4096", "--json")
    assert res.exit_code == 0, res.output
    kv = json.loads(res.stdout)["kv_cache"]
    assert kv["window_over_full"] <= 0.30
    assert kv["window_sized_bytes"] == 56_623_104


def test_inspect_takes_no_weight_options():
    res = run("inspect", "gemma3-1b", "--random-weights")
    assert res.exit_code == 2 and "No such option '--random-weights'" in res.output


def test_inspect_text_output():
    res = run("inspect", "gemma3-4b", "--context", "131072")
    assert res.exit_code == 0
    assert "window-sized" in res.output and "34 (29 local, window 1024; 5 global)" in res.output


def test_generate_tiny_random_json():
    res = run("generate", "tiny", "--random-weights", "--prompt", "Hello there", "--max-new-tokens", "5",
              "--prefill-len", "8", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["tokens"]) == 5 and out["prompt_tokens"] == 3


def test_sampling_seed_and_weights_seed_are_separate():
    base = ["generate", "tiny", "--random-weights", "--prompt", "Hi", "--max-new-tokens", "6", "--json"]
    tokens = lambda *extra: json.loads(run(*base, *extra).stdout)["tokens"]  # noqa: E731
    hot = ("--temperature", "1.0")
    sampled = tokens(*hot, "--seed", "7")
    assert sampled == tokens(*hot, "--seed", "7") != tokens(*hot, "--seed", "8")  # --seed moves the samples...
    greedy = tokens("--seed", "1")
    assert greedy == tokens("--seed", "2")  # ...and nothing else: the weights stay
    assert greedy != tokens("--weights-seed", "2")  # other weights


def test_unknown_model_is_one_line_error():
    res = run("generate", "gemma9", "--prompt", "x")
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [res.output.strip()]
    assert "no such preset, folder or file" in res.output


def test_preset_without_weights_needs_random_flag():
    res = run("generate", "gemma3-1b", "--prompt", "x")
    assert res.exit_code == 1 and "--random-weights" in res.output


def test_bad_max_context():
    res = run("generate", "tiny", "--random-weights", "--prompt", "x", "--max-context", "99999")
    assert res.exit_code == 1 and "max context" in res.output


def test_bad_checkpoint_is_one_line(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    res = run("inspect", tmp_path / "w.bin")
    out = res.output.strip()
    assert res.exit_code == 1 and out.startswith("Error: ") and "pickle" in out and len(out.splitlines()) == 1


def test_recipes_lists_presets():
    res = run("recipes", "--json")
    assert res.exit_code == 0
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) >= {"fp32", "int8", "int4-b32", "int4-b32-rtn"}
    assert rows["int8-weights"]["formats"] == ["onnx"] and rows["fp32"]["formats"] == ["pte", "onnx", "tflite"]
    assert rows["a16w8"]["formats"] == ["onnx", "qnn"]


def test_eval_quantized_tiny_against_fp32():
    res = run("eval", "tiny", "--random-weights", "--recipe", "int4-b32-rtn", "--positions", "80",
              "--prefill-len", "16", "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)  # progress went to stderr
    assert r["positions"] == 80 and 0 < r["mean_kl"] and 0 < r["top1_agreement"] <= 1
    assert r["perplexity"] > 0 and r["perplexity_reference"] > 0


def test_unknown_recipe_is_one_line_error():
    res = run("eval", "tiny", "--random-weights", "--recipe", "int3")
    assert res.exit_code == 1 and "unknown recipe" in res.output


def test_export_reports_progress_and_summary(tmp_path):
    out = tmp_path / "cli-onnx"
    res = run("export", "tiny", "--random-weights", "--format", "onnx", "--out", out, "--prefill-len", "8",
              "--max-context", "64")
    assert res.exit_code == 0, res.output
    assert "onnx artifact" in res.output and "rss" in res.output and (out / "manifest.json").is_file()
    res = run("export", "tiny", "--random-weights", "--format", "coreml", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "coreml is not a format" in res.output


def test_verify_locate_names_the_faulty_layer(artifacts, tiny, tmp_path):
    """`verify --locate` on an artifact with a planted fault: exit 3, and the layer is named."""
    out = artifacts.copy("onnx", tmp_path / "onnx")
    plant(out, tiny.layers[0].self_attn.v_proj.weight.detach().numpy(), factor=-2.0)
    report = tmp_path / "report"
    res = run("verify", out, "--positions", "60", "--new-tokens", "4", "--locate", "--report", report)
    assert res.exit_code == 3, res.output
    assert "first diverging: layer 0" in res.output
    assert "**layer 0**" in (report / "report.md").read_text()


def test_verify_needs_something_to_verify():
    res = run("verify")
    assert res.exit_code == 2 and "give an ARTIFACT" in res.output
