"""Golden bundles: bundle -> (desktop or device) runner -> verify --outputs, and the adb script's refusals."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gemma_export.artifact import sha256_file
from gemma_export.verification.bundle import INPUTS, OUTPUTS, call_plan, full_positions_for, read_inputs
from helpers import T, cli as run

NEW = 8


@pytest.fixture(scope="module")
def artifact(artifacts, tmp_path_factory):
    return artifacts.copy("onnx", tmp_path_factory.mktemp("bundle") / "onnx-fp32")


@pytest.fixture(scope="module")
def bundle(artifact):
    out = artifact.parent / "golden"
    res = run("bundle", artifact, "--out", out, "--new-tokens", NEW)
    assert res.exit_code == 0, res.output
    assert "48 positions in 1 prefill + 32 decode calls, 8 greedy tokens" in res.output
    return out


@pytest.fixture(scope="module")
def outputs(bundle, artifact):
    out = bundle.parent / "desktop-outputs"
    res = run("bundle-run", bundle, "--artifact", artifact, "--out", out)
    assert res.exit_code == 0, res.output
    return out


def tampered(outputs, tmp_path, name, change):
    copy = tmp_path / "outputs"
    shutil.copytree(outputs, copy)
    arr = np.fromfile(copy / f"{name}.bin", dtype=OUTPUTS[name])
    change(arr)
    arr.tofile(copy / f"{name}.bin")
    return copy


def test_call_plan_covers_every_position_once_prefill_then_decode():
    calls = call_plan(600, 128)
    assert calls[:2].tolist() == [[0, 128], [128, 128]] and (calls[2:, 1] == 1).all()
    assert calls[2, 0] == 256 and calls[-1, 0] == 599 and calls[:, 1].sum() == 600
    assert call_plan(10, 16).tolist() == [[0, 10]]
    assert full_positions_for(48, 16) == [0, 15, 16, 47]


def test_bundle_layout(bundle, artifact):
    index = json.loads((bundle / "index.json").read_text())
    a = index["artifact"]
    assert (a["name"], a["format"], a["prefill_len"], a["window"]) == ("onnx-fp32", "onnx", T, 16)
    assert a["manifest_sha256"] == sha256_file(artifact / "manifest.json")
    assert a["files"]["model.onnx.data"] == json.loads((artifact / "manifest.json").read_text())["files"][
        "model.onnx.data"]["sha256"]
    assert index["positions"] == 48 and index["topk"] == 64 and index["full_positions"] == [0, 15, 16, 47]
    assert index["calls"]["sequence"][:2] == [[0, 16], [16, 1]] and len(index["calls"]["sequence"]) == 33
    assert set(index["outputs"]) == set(OUTPUTS) and index["outputs"]["full_logits"]["shape"] == [4, 262_144]
    # the raw .bin inputs a device runner reads are the arrays of inputs.npz
    npz, raw = np.load(bundle / "inputs.npz"), read_inputs(bundle, index)
    for name in INPUTS:
        assert np.array_equal(npz[name], raw[name]), name
    ref = np.load(bundle / "reference.npz")
    assert ref["topk_values"].shape == (48, 64) and ref["greedy_tokens"].shape == (NEW,)
    assert (np.diff(ref["topk_values"], axis=1) <= 0).all()  # descending
    assert (bundle / "reference.npz").stat().st_size < 5 * 2**20  # top-k everywhere, full logits at 4 positions
    assert os.access(bundle / "run_on_device.sh", os.X_OK)


def test_round_trip_passes(bundle, outputs, artifact, tmp_path):
    assert sorted(p.name for p in outputs.iterdir()) == sorted([f"{n}.bin" for n in OUTPUTS] + ["index.json"])
    res = run("verify", "--outputs", outputs, "--bundle", bundle)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == f"PASS {outputs} against bundle {bundle} (onnx)"
    res = run("verify", "--outputs", outputs, "--bundle", bundle, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["topk"]["top1_agreement"] == 1.0 and report["full_logits"]["max_abs_diff"] < 1e-4
    assert report["greedy_equal"] and report["greedy_tokens"] == NEW
    # the bundle is found from the outputs' index.json; the artifact, when given, must be the bundle's
    assert run("verify", "--outputs", outputs).exit_code == 0
    assert run("verify", artifact, "--outputs", outputs).exit_code == 0


def test_perturbed_logits_fail_with_exit_3(outputs, tmp_path):
    rng = np.random.default_rng(0)
    bad = tampered(outputs, tmp_path, "at_reference", lambda a: a.__iadd__(rng.normal(0, 1, a.shape).astype(a.dtype)))
    res = run("verify", "--outputs", bad)
    assert res.exit_code == 3, res.output
    assert "parity FAILED" in res.output and "top-64 logits: mean_kl" in res.output
    assert "judged against the reference" in res.output


def test_changed_top1_and_greedy_fail_with_exit_3(outputs, tmp_path):
    def swap_first_two(a):
        a.shape = (48, 64)
        a[::2, [0, 1]] = a[::2, [1, 0]]

    res = run("verify", "--outputs", tampered(outputs, tmp_path / "a", "topk_indices", swap_first_two))
    assert res.exit_code == 3 and "top-64 logits: top1_agreement = 0.5, needs >= 0.999" in res.output
    bad = tampered(outputs, tmp_path / "b", "greedy_tokens", lambda a: a.__setitem__(3, a[3] + 1))
    res = run("verify", "--outputs", bad)
    assert res.exit_code == 3 and f"greedy generation diverges at token 3 of {NEW}" in res.output


def test_bad_outputs_are_errors_with_exit_1(bundle, outputs, artifact, tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(outputs, missing)
    (missing / "at_reference.bin").unlink()
    res = run("verify", "--outputs", missing)
    assert res.exit_code == 1 and "at_reference.bin: missing" in res.output
    short = tampered(outputs, tmp_path, "full_logits", lambda a: None)
    short.joinpath("full_logits.bin").write_bytes(b"\0" * 64)
    res = run("verify", "--outputs", short)
    assert res.exit_code == 1 and "16 values, expected shape [4, 262144]" in res.output
    other = tmp_path / "other"  # same files, a different manifest
    shutil.copytree(artifact, other)
    m = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**m, "job": {**m["job"], "note": "rebuilt"}}))
    res = run("verify", other, "--outputs", outputs)
    assert res.exit_code == 1 and "not the artifact this bundle was made from" in res.output
    res = run("bundle-run", bundle, "--artifact", other, "--out", tmp_path / "x")
    assert res.exit_code == 1 and "not the artifact this bundle was made from" in res.output
    orphan = tmp_path / "orphan"
    shutil.copytree(outputs, orphan)
    (orphan / "index.json").unlink()
    res = run("verify", "--outputs", orphan)
    assert res.exit_code == 1 and "pass --bundle" in res.output


# ----------------------------------------------------------------------------------------------
# run_on_device.sh on this machine: no adb, an adb with no device, and an adb-shaped local "device"
# ----------------------------------------------------------------------------------------------


def tool_dir(tmp_path, tools):
    """A PATH holding only the given system tools (so an adb installed elsewhere cannot leak in)."""
    d = tmp_path / "bin"
    d.mkdir()
    for t in tools:
        (d / t).symlink_to(shutil.which(t))
    return d


def script(bundle, artifact, path, **env):
    return subprocess.run(["/bin/sh", str(bundle / "run_on_device.sh"), str(artifact)], capture_output=True,
                          text=True, env={"PATH": str(path), **env}, timeout=120)


FAKE_ADB = """#!/bin/sh
case "$1" in
  devices) printf 'List of devices attached\\n%s\\n\\n' "$FAKE_DEVICES" ;;
  push|pull) cp "$2" "$3" ;;
  shell) shift; exec sh -c "$*" ;;
  *) echo "fake adb: $*" >&2; exit 1 ;;
esac
"""


def fake_adb(path):
    (path / "adb").write_text(FAKE_ADB)
    (path / "adb").chmod(0o755)


def test_script_without_adb_says_so(bundle, artifact, tmp_path):
    res = script(bundle, artifact, tool_dir(tmp_path, ["dirname"]))
    assert res.returncode == 2 and "no device: adb not found" in res.stderr


def test_script_with_no_device_attached_says_so(bundle, artifact, tmp_path):
    path = tool_dir(tmp_path, ["dirname", "awk", "wc", "cp"])
    fake_adb(path)
    res = script(bundle, artifact, path, FAKE_DEVICES="")
    assert res.returncode == 2 and "no device attached" in res.stderr
    res = script(bundle, artifact, path, FAKE_DEVICES="emulator-5554\toffline")  # listed but not usable
    assert res.returncode == 2 and "no device attached" in res.stderr
    res = script(bundle, artifact, path, FAKE_DEVICES="emulator-5554\tdevice")
    assert res.returncode == 2 and "set GEMMA_ONNX_RUNNER" in res.stderr


def test_script_round_trip_through_an_adb_shaped_device(bundle, artifact, tmp_path):
    """adb push/shell/pull on a local folder; the "on-device" runner is `gemma-export bundle-run`."""
    path = tool_dir(tmp_path, ["dirname", "awk", "wc", "cp", "sha256sum", "rm", "mkdir", "chmod", "sh"])
    fake_adb(path)
    runner = tmp_path / "runner.sh"
    runner.write_text(f'#!/bin/sh\nexec {sys.executable} -m gemma_export bundle-run "$@"\n')
    runner.chmod(0o755)
    out = tmp_path / "pulled"
    res = subprocess.run(["/bin/sh", str(bundle / "run_on_device.sh"), str(artifact), str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": str(path), "FAKE_DEVICES": "emulator-5554\tdevice",
                              "DEVICE_DIR": str(tmp_path / "phone"), "GEMMA_ONNX_RUNNER": str(runner)})
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "phone" / "artifact" / "model.onnx.data").is_file()
    assert json.loads((out / "index.json").read_text())["produced_by"].startswith("run_on_device.sh on emulator-5554")
    check = run("verify", "--outputs", out)
    assert check.exit_code == 0, check.output
    assert check.output.splitlines()[-1] == f"PASS {out} against bundle {bundle} (onnx)"


@pytest.mark.slow
def test_runtime_quantized_artifact_is_judged_relative_to_the_recipe_on_device(artifacts, tmp_path):
    """The same rule as `verify`: an int4 artifact's device outputs are compared with fp32, relative to
    the recipe in PyTorch run the same way (stored in the bundle), and wrong outputs still fail."""
    art = artifacts.copy("onnx", tmp_path / "int4", "int4-b32-rtn")
    bundle = tmp_path / "golden"
    assert run("bundle", art, "--out", bundle, "--new-tokens", NEW).exit_code == 0
    index = json.loads((bundle / "index.json").read_text())
    assert index["baseline"]["file"] == "baseline.npz" and (bundle / "baseline.npz").is_file()
    assert "quantized in PyTorch" in index["baseline"]["description"]
    assert "quantized" not in index["reference"]["description"]
    out = tmp_path / "device"
    assert run("bundle-run", bundle, "--artifact", art, "--out", out).exit_code == 0
    res = run("verify", "--outputs", out, "--json")
    checked = json.loads(res.stdout)
    assert res.exit_code == 0 and checked["judged"] == "against fp32, relative to the recipe in PyTorch", checked
    assert {c["source"] for c in checked["checks"]} == {"relative to the recipe"}
    rng = np.random.default_rng(0)
    bad = tampered(out, tmp_path, "at_reference", lambda a: a.__iadd__(rng.normal(0, 2, a.shape).astype(a.dtype)))
    res = run("verify", "--outputs", bad)
    assert res.exit_code == 3 and "mean KL to fp32" in res.output, res.output


# ----------------------------------------------------------------------------------------------
# The stock runtime tool: run_stock_on_device.sh, bundle-run --stock, verify --outputs on its text
# ----------------------------------------------------------------------------------------------

# onnxruntime-genai's model-generate example, as a phone would run it: takes the arguments the
# bundle's script passes (-m DIR -e cpu --prompt TEXT --max_length N --greedy) and prints the text
FAKE_GENAI_TOOL = """#!{python}
import argparse, numpy as np, onnxruntime_genai as og
p = argparse.ArgumentParser()
p.add_argument("-m"); p.add_argument("-e"); p.add_argument("--prompt"); p.add_argument("--max_length", type=int)
p.add_argument("--greedy", action="store_true")
a = p.parse_args()
assert a.greedy and a.e == "cpu"
model = og.Model(a.m); tok = og.Tokenizer(model); stream = tok.create_stream()
params = og.GeneratorParams(model); params.set_search_options(do_sample=False)
gen = og.Generator(model, params); ids = tok.encode(a.prompt)
gen.append_tokens(np.asarray(ids, np.int32))
print(a.prompt, end="")
while not gen.is_done() and len(ids) < a.max_length:
    gen.generate_next_token(); t = int(gen.get_next_tokens()[0]); ids = [*ids, t]
    print(stream.decode(t), end="", flush=True)
print("\\ntokens/s: 1.0")
"""


def test_stock_tool_round_trip_through_an_adb_shaped_device(bundle, artifact, tmp_path):
    index = json.loads((bundle / "index.json").read_text())
    assert index["stock"]["prompt"].startswith("<bos>")  # genai's tokenizer adds none
    path = tool_dir(tmp_path, ["dirname", "awk", "cp", "sha256sum", "rm", "mkdir", "chmod", "sh", "cat"])
    fake_adb(path)
    tool = tmp_path / "model_generate"
    tool.write_text(FAKE_GENAI_TOOL.format(python=sys.executable))
    tool.chmod(0o755)
    out = tmp_path / "stock"
    res = subprocess.run(["/bin/sh", str(bundle / "run_stock_on_device.sh"), str(artifact), str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": str(path), "DEVICE_DIR": str(tmp_path / "phone"), "GEMMA_ONNX_RUNNER": str(tool)})
    assert res.returncode == 0, res.stderr
    check = run("verify", "--outputs", out, "--json")
    assert check.exit_code == 0, check.output
    report = json.loads(check.stdout)
    assert report["stock"]["found"] and report["stock"]["reference_text"], report


def test_stock_desktop_round_trip_and_a_wrong_text_fails(bundle, artifact, tmp_path):
    out = tmp_path / "stock-desktop"
    res = run("bundle-run", bundle, "--artifact", artifact, "--out", out, "--stock")
    assert res.exit_code == 0, res.output
    check = run("verify", "--outputs", out)
    assert check.exit_code == 0 and check.output.splitlines()[-1].startswith("PASS"), check.output
    text = (out / "stock_output.txt").read_text()
    (out / "stock_output.txt").write_text(text[: len(text) // 2])  # the tool stopped early
    check = run("verify", "--outputs", out)
    assert check.exit_code == 3 and "does not contain the reference's" in check.output, check.output


@pytest.fixture(scope="module")
def image_bundle(artifacts, tmp_path_factory):
    """A bundle of the tiny image artifact: its text as above, plus the image prompts verify runs."""
    root = tmp_path_factory.mktemp("image-bundle")
    artifact = artifacts.copy("onnx", root / "onnx-images", images=True)
    res = run("bundle", artifact, "--out", root / "golden", "--new-tokens", NEW)
    assert res.exit_code == 0, res.output
    assert "2 image prompts" in res.output
    out = root / "outputs"
    res = run("bundle-run", root / "golden", "--artifact", artifact, "--out", out)
    assert res.exit_code == 0, res.output
    return root / "golden", out


def test_image_prompts_round_trip_and_a_changed_view_fails(image_bundle, tmp_path):
    bundle, outputs = image_bundle
    index = json.loads((bundle / "index.json").read_text())
    prompts = index["images"]["prompts"]
    assert [p["label"] for p in prompts.values()] == ["image+text", "pan-and-scan"]
    assert [p["views"] for p in prompts.values()] == [1, 5]
    pixels = read_inputs(bundle, index)["image1_pixels"]
    assert pixels.dtype == np.float32 and pixels.shape == (5, 3, 56, 56)
    script = (bundle / "run_on_device.sh").read_text()  # pushes the image inputs, pulls their logits, says how
    assert "image0_prompt image0_pixels image0_teacher" in script and " image1_logits\"" in script
    assert "image{i}_logits.bin  float32 [G + 1, V]" in script
    res = run("verify", "--outputs", outputs, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["images"]["judged"] and {c["label"] for c in report["checks"]} >= {"image+text", "pan-and-scan"}
    assert report["images"]["pan-and-scan"]["greedy_test"] == report["images"]["pan-and-scan"]["greedy_reference"]
    # the logits of the pan-and-scan prompt from a run that lost a view's bidirectional attention
    copy = tmp_path / "outputs"
    shutil.copytree(outputs, copy)
    spec = index["outputs"]["image1_logits"]
    logits = np.fromfile(copy / spec["file"], np.float32).reshape(spec["shape"])
    logits[0] = np.roll(logits[0], 1)
    logits.tofile(copy / spec["file"])
    res = run("verify", "--outputs", copy)
    assert res.exit_code == 3 and "pan-and-scan" in res.output, res.output
