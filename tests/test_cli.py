import json
import subprocess
import sys

from click.testing import CliRunner

from gemma_export.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_help_does_not_import_torch():
    code = "import sys; from gemma_export.cli import cli; sys.argv=['gemma-export','--help']\n" \
           "try:\n    cli()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_models_lists_presets():
    res = run("models", "--json")
    assert res.exit_code == 0
    names = [r["name"] for r in json.loads(res.output)]
    assert {"gemma3-270m", "gemma3-1b", "gemma3-4b", "tiny"} <= set(names)


def test_inspect_1b_window_cache_fraction():
    res = run("inspect", "gemma3-1b", "--random-weights", "--context", "4096", "--json")
    assert res.exit_code == 0, res.output
    kv = json.loads(res.output)["kv_cache"]
    assert kv["window_over_full"] <= 0.30
    assert kv["window_sized_bytes"] == 56_623_104


def test_inspect_text_output():
    res = run("inspect", "gemma3-4b", "--context", "131072")
    assert res.exit_code == 0
    assert "window-sized" in res.output and "34 (29 local, window 1024; 5 global)" in res.output


def test_generate_tiny_random_json():
    res = run("generate", "tiny", "--random-weights", "--prompt", "Hello there", "--max-new-tokens", "5",
              "--prefill-len", "8", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert len(out["tokens"]) == 5


def test_generate_sampling_is_seeded():
    args = ["generate", "tiny", "--random-weights", "--prompt", "Hi", "--max-new-tokens", "6",
            "--temperature", "1.0", "--seed", "7", "--json"]
    a, b = run(*args), run(*args)
    assert json.loads(a.output)["tokens"] == json.loads(b.output)["tokens"]


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


def test_recipes_lists_presets():
    res = run("recipes", "--json")
    assert res.exit_code == 0
    assert {r["name"] for r in json.loads(res.output)} >= {"fp32", "int8", "int4-b32", "int4-b32-rtn"}


def test_eval_quantized_tiny_against_fp32(tmp_path):
    out = tmp_path / "eval.json"
    res = run("eval", "tiny", "--random-weights", "--recipe", "int4-b32-rtn", "--positions", "80",
              "--prefill-len", "16", "--json", str(out))
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["positions"] == 80 and 0 < r["mean_kl"] and 0 < r["top1_agreement"] <= 1
    assert r["perplexity"] > 0 and r["perplexity_reference"] > 0


def test_unknown_recipe_is_one_line_error():
    res = run("eval", "tiny", "--random-weights", "--recipe", "int3")
    assert res.exit_code == 1 and "unknown recipe" in res.output
