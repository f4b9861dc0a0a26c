"""Artifact folders: the typed manifest, atomic staging, and one clear error (exit 1 from `verify`,
before any model runs) for each way a folder can disagree with its manifest."""

import json

import pytest

from gemma_export.artifact import MANIFEST_VERSION, Manifest, check_destination, find_artifacts, read_manifest, staging
from gemma_export.errors import ArtifactError, CheckpointError, ConfigError
from gemma_export.runtime import open_artifact
from helpers import cli, resign_file, small_tokenizer


@pytest.fixture
def copy(artifacts, tmp_path):
    return artifacts.copy("onnx", tmp_path / "art")


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def write_raw_manifest(folder, m):
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))


def verify_error(folder):
    """`verify` fails with exit 1 and exactly one line besides its progress lines; returns that line."""
    res = cli("verify", folder, "--positions", "20", "--new-tokens", "2")
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def test_flipped_bytes_same_size_is_a_sha256_mismatch(copy):
    data = copy / "model.onnx.data"
    size = data.stat().st_size
    with data.open("r+b") as f:
        f.seek(size // 2)
        block = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    assert data.stat().st_size == size
    line = verify_error(copy)
    assert line == f"Error: {data}: sha256 does not match the manifest (corrupted or replaced)"


def test_truncated_model_file(copy):
    data = copy / "model.onnx.data"
    full = data.stat().st_size
    data.write_bytes(data.read_bytes()[: full // 3])
    line = verify_error(copy)
    assert line == f"Error: {data}: {full // 3} bytes, the manifest says {full} (truncated or replaced)"


def test_truncated_model_with_a_matching_manifest_fails_to_load(copy):
    data = copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    resign_file(copy, "model.onnx.data")
    line = verify_error(copy)
    assert line.startswith(f"Error: {copy / 'model.onnx'}: onnxruntime could not load the graph")


def test_manifest_lists_a_missing_file(copy):
    (copy / "model.onnx.data").unlink()
    assert verify_error(copy) == f"Error: {copy / 'model.onnx.data'}: listed in the manifest but missing"


def test_manifest_lists_an_extra_file(copy):
    m = manifest(copy)
    m["files"]["weights-2.bin"] = {"bytes": 10, "sha256": "0" * 64}
    write_raw_manifest(copy, m)
    assert verify_error(copy) == f"Error: {copy / 'weights-2.bin'}: listed in the manifest but missing"


def test_file_not_listed_in_the_manifest(copy):
    (copy / "model.onnx.data.orig").write_bytes(b"left behind")
    line = verify_error(copy)
    assert line == (f"Error: {copy}: model.onnx.data.orig not listed in the manifest "
                    "(added after export, or the manifest belongs to other files)")
    open_artifact(copy)  # a stray file does not stop the runtime (generate); only verify is strict


def test_manifest_names_a_program_file_it_does_not_list(copy):
    m = manifest(copy)
    del m["files"]["model.onnx"]
    write_raw_manifest(copy, m)
    line = verify_error(copy)
    assert line == f"Error: {copy}: the manifest names model.onnx but does not list it with a size and sha256"


def test_corrupt_manifest(copy):
    (copy / "manifest.json").write_text('{"format": "onnx", "files": {')
    assert verify_error(copy).startswith(f"Error: {copy / 'manifest.json'}: corrupt manifest")


def test_tokenizer_of_another_vocabulary(copy):
    n = small_tokenizer(copy / "tokenizer.json")
    assert verify_error(copy).endswith("(truncated or replaced)")  # caught by the manifest first
    resign_file(copy, "tokenizer.json")  # a manifest written for the wrong tokenizer
    line = verify_error(copy)
    assert line == (f"Error: {copy}: tokenizer tokenizer.json has {n} tokens, the model's vocabulary 262144; "
                    "it is not this model's tokenizer")
    with pytest.raises(ArtifactError, match="not this model's tokenizer"):
        open_artifact(copy)


def test_manifest_of_another_version_or_shape(copy):
    m = manifest(copy)
    write_raw_manifest(copy, {**m, "manifest_version": 1})
    assert verify_error(copy).endswith("manifest version 1, this gemma-export reads version 3; re-export the artifact")
    del m["window"]
    write_raw_manifest(copy, m)
    assert "manifest does not match its schema" in verify_error(copy)


def test_tokenizer_that_is_not_gemma(copy):
    small_tokenizer(copy / "tokenizer.json", specials=("[PAD]", "[CLS]"))
    resign_file(copy, "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer has no <bos> token; not a Gemma tokenizer"):
        open_artifact(copy)
    assert verify_error(copy).endswith("not a Gemma tokenizer")


def test_manifest_round_trips_through_its_type(artifacts):
    m = read_manifest(artifacts.get("onnx"))
    assert isinstance(m, Manifest) and m.manifest_version == MANIFEST_VERSION
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert m.named_files() == ["model.onnx", "model.onnx.data", "tokenizer.json"]
    assert m.recipe_name == "fp32" and m.vocab_size == 262_144 and m.num_layers == 2


def test_staging_leaves_nothing_behind_on_failure(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="planted"):
        with staging(out) as tmp:
            (tmp / "model.bin").write_bytes(b"half")
            raise RuntimeError("planted")
    assert list(tmp_path.iterdir()) == []
    with staging(out) as tmp:
        (tmp / "model.bin").write_bytes(b"whole")
    assert (out / "model.bin").read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["art"]


def test_destinations_are_checked(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        check_destination(out, force=False)
    with pytest.raises(ConfigError, match="not an artifact folder"):
        check_destination(out, force=True)
    check_destination(tmp_path / "new", force=False)


def test_find_artifacts_skips_staging_folders(artifacts, tmp_path):
    artifacts.copy("onnx", tmp_path / "build" / "a")
    artifacts.copy("onnx", tmp_path / "build" / ".b.partial-x")
    assert find_artifacts(tmp_path / "build") == [tmp_path / "build" / "a"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no artifact folders"):
        find_artifacts(tmp_path / "empty")
