"""Faults an export must survive: interrupts at every stage, an output place that cannot be written,
too little disk, a disk that fills while writing, and two exports racing for the same folder. Each
ends with one line, a non-zero exit and nothing left behind (no --out, no staging folder, no lock)."""

import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from gemma_export import artifact, pipeline
from gemma_export.errors import ConfigError
from gemma_export.pipeline import ExportJob
from helpers import CTX, TINY, T

TINY_ARGS = ["tiny", "--random-weights", "--prefill-len", str(T), "--max-context", str(CTX)]


def spawn(tmp_path, *args, preexec=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def setup():
        # a job started in the background (CI under nohup or `&`) inherits SIGINT ignored, and
        # Python then leaves it ignored: the export runs as a terminal would start it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec:
            preexec()

    return subprocess.Popen([sys.executable, "-m", "gemma_export", "export", *TINY_ARGS, *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=setup)


def left_behind(folder):
    return sorted(p.name for p in folder.iterdir())


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("stage, sig, fmt, recipe", [
    ("loading", signal.SIGTERM, "onnx", "fp32"),
    ("calibrating", signal.SIGINT, "onnx", "int4-b32"),
    ("torch.onnx.export", signal.SIGTERM, "onnx", "fp32"),
    ("writing manifest", signal.SIGINT, "onnx", "fp32"),
])
def test_an_interrupt_at_any_stage_leaves_nothing(tmp_path, stage, sig, fmt, recipe):
    build = tmp_path / "build"
    build.mkdir()
    proc = spawn(build, "--format", fmt, "--recipe", recipe, "--out", build / "dist" / "art")
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if stage in line:
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=300)[1]
    assert any(stage in line for line in seen), "".join(seen)
    assert proc.returncode == 128 + sig, "".join(seen) + rest
    assert error_lines(rest) == [f"Error: interrupted by {sig.name}; nothing was left half-written"], rest
    assert left_behind(build) == []  # the parent folder it made is gone too


def test_a_disk_that_fills_while_writing_is_one_line_and_nothing_left(tmp_path):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))

    out = tmp_path / "art"
    proc = spawn(tmp_path, "--format", "onnx", "--out", out, preexec=small_files)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert error_lines(err) == [f"Error: {out}: file size limit reached while writing; nothing was left at {out}"], err
    assert left_behind(tmp_path) == []


def test_two_exports_racing_for_one_folder(tmp_path):
    out = tmp_path / "art"
    procs = [spawn(tmp_path, "--format", "onnx", "--out", out) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    (line,) = error_lines(loser)
    assert "another export is writing there" in line or "already exists" in line, line
    assert left_behind(tmp_path) == ["art"] and artifact.read_manifest(out).format == "onnx"


def test_a_held_folder_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load", lambda *a: pytest.fail("the model was loaded"))
    out = tmp_path / "art"
    with artifact.claim(out):
        with pytest.raises(ConfigError, match="another export is writing there right now"):
            pipeline.export(ExportJob.single(TINY, "onnx", out, prefill_len=T))
    assert left_behind(tmp_path) == []


def test_an_unwritable_place_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load", lambda *a: pytest.fail("the model was loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        pipeline.export(ExportJob.single(TINY, "onnx", blocker / "sub" / "art", prefill_len=T))
    # a folder this user may not write in (root may write anywhere, so the permission is simulated)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(artifact.os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(ConfigError, match=f"cannot write in {locked}"):
        pipeline.export(ExportJob.single(TINY, "onnx", locked / "art", prefill_len=T))
    assert left_behind(tmp_path) == ["file", "locked"] and left_behind(locked) == []


def test_too_little_free_disk_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load", lambda *a: pytest.fail("the model was loaded"))
    real = shutil.disk_usage
    monkeypatch.setattr(artifact.shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    out = tmp_path / "new" / "art"
    with pytest.raises(ConfigError, match=r"10 MiB free on .*, the export needs about \d+ MiB"):
        pipeline.export(ExportJob.each(TINY, ["onnx", "tflite"], out, prefill_len=T))
    assert left_behind(tmp_path) == []  # the parent it made for --out is removed again
