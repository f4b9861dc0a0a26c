"""`gemma-export lint`: every way an artifact can be incomplete or mislabelled is one line, and a
clean artifact of every format has none (entry points read back from the model file itself)."""

import json

import pytest

from gemma_export.lint import lint
from gemma_export.quant.recipes import PRESETS
from helpers import FORMATS, cli, resign_file, small_tokenizer


def edit(folder, change):
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m, indent=2))


def lines(folder):
    return [p.line() for p in lint(folder).problems]


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=pytest.mark.slow) if f == "pte" else f for f in FORMATS])
def test_a_fresh_artifact_of_every_format_is_clean(artifacts, fmt):
    report = lint(artifacts.get(fmt))
    assert report.passed and report.format == fmt, report.problems


def test_each_fault_is_one_line(artifacts, tmp_path):
    art = artifacts.copy("onnx", tmp_path / "a")
    (art / "notes.txt").write_text("added after export")
    edit(art, lambda m: m["entry_points"]["decoder"]["inputs"][2]["shape"].__setitem__(2, 99))
    edit(art, lambda m: m["tokenizer"].__setitem__("stop", ["<eos>"]))
    edit(art, lambda m: m.__setitem__("recipe", PRESETS["int4-b32"].to_dict()))  # claims int4, holds fp32
    found = lines(art)
    assert "files: notes.txt is not listed in the manifest" in found
    assert "tokenizer: stop tokens <end_of_turn> missing (generation would not stop)" in found
    assert any(f.startswith("entry points: decoder inputs: past_key_values.0.key: shape [1, 1, 99, 32] in the "
                            "manifest, [1, 1, 32, 32] in the file") for f in found), found
    assert any(f.startswith("recipe: recipe int4-b32") for f in found), found
    res = cli("lint", art)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == len(found)
    data = json.loads(cli("lint", art, "--json").stdout)
    assert data["pass"] is False and len(data["problems"]) == len(found)


def test_a_replaced_tokenizer_is_caught_even_when_resigned(artifacts, tmp_path):
    art = artifacts.copy("onnx", tmp_path / "a")
    small_tokenizer(art / "tokenizer.json")
    resign_file(art, "tokenizer.json")
    assert lines(art) == ["tokenizer: tokenizer.json is not the tokenizer the model was exported with (sha256 differs)"]


@pytest.mark.slow  # lowers ExecuTorch
def test_a_program_declaring_other_dtypes_than_its_manifest(artifacts, tmp_path):
    art = artifacts.copy("pte", tmp_path / "p")
    edit(art, lambda m: m["entry_points"]["forward"]["inputs"][0].__setitem__("dtype", "int32"))
    assert lines(art) == ["entry points: forward inputs: tokens: dtype int32 in the manifest, int64 in the file"]
    art2 = artifacts.copy("tflite", tmp_path / "t")
    edit(art2, lambda m: m["entry_points"].__setitem__("prefill_64", m["entry_points"]["prefill_16"]))
    assert any(f.startswith("entry points: prefill_64 is not in model.litertlm") for f in lines(art2))


def test_schema_faults_are_named_with_their_place(artifacts, tmp_path):
    art = artifacts.copy("onnx", tmp_path / "a")
    edit(art, lambda m: m.__setitem__("prefill_len", "16") or m["files"]["model.onnx"].__setitem__("sha256", "xyz"))
    found = lines(art)
    assert "schema: files/model.onnx/sha256: 'xyz' does not match '^[0-9a-f]{64}$'" in found
    assert "schema: prefill_len: '16' is not of type 'integer'" in found
    (art / "manifest.json").write_text("[1, 2")
    assert lines(art)[0].startswith(f"schema: {art / 'manifest.json'}: corrupt manifest (JSONDecodeError")
    assert lines(tmp_path / "nowhere") == [f"schema: {tmp_path / 'nowhere'} is not a folder"]
