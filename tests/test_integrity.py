"""A damaged artifact is one clear error (exit 1) from `verify`, before any model runs."""

import json
import shutil

import pytest
from click.testing import CliRunner

from gemma_export.cli import cli
from gemma_export.errors import ArtifactError, CheckpointError
from gemma_export.loading import ModelSpec
from gemma_export.package import ExportRequest, export, open_artifact, sha256_file

T, CTX = 16, 256
TINY = ModelSpec("tiny", random_weights=True, seed=0, max_context=CTX)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "onnx-fp32"
    export(TINY, ExportRequest("onnx", prefill_len=T, max_context=CTX), out)
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(artifact, dst)
    return dst


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder, m):
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))


def resign(folder, name):
    """Record a changed file's size and hash, as if the manifest had been written for it."""
    m = manifest(folder)
    m["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    write_manifest(folder, m)


def verify_error(folder):
    """`verify` fails with exit 1 and exactly one line on stderr; returns that line."""
    res = CliRunner().invoke(cli, ["verify", str(folder), "--positions", "20", "--new-tokens", "2"])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def small_tokenizer(path, specials=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*specials, "<unk>", "the", "capital", "of", "France", "is"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return len(vocab)


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
    resign(copy, "model.onnx.data")
    line = verify_error(copy)
    assert line.startswith(f"Error: {copy / 'model.onnx'}: onnxruntime could not load the graph")


def test_manifest_lists_a_missing_file(copy):
    (copy / "model.onnx.data").unlink()
    assert verify_error(copy) == f"Error: {copy / 'model.onnx.data'}: listed in the manifest but missing"


def test_manifest_lists_an_extra_file(copy):
    m = manifest(copy)
    m["files"]["weights-2.bin"] = {"bytes": 10, "sha256": "0" * 64}
    write_manifest(copy, m)
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
    write_manifest(copy, m)
    line = verify_error(copy)
    assert line == f"Error: {copy}: the manifest names model.onnx but does not list it with a size and sha256"


def test_corrupt_manifest(copy):
    (copy / "manifest.json").write_text('{"format": "onnx", "files": {')
    assert verify_error(copy).startswith(f"Error: {copy / 'manifest.json'}: corrupt manifest")


def test_tokenizer_of_another_vocabulary(copy):
    n = small_tokenizer(copy / "tokenizer.json")
    assert verify_error(copy).endswith("(truncated or replaced)")  # caught by the manifest first
    resign(copy, "tokenizer.json")  # a manifest written for the wrong tokenizer
    line = verify_error(copy)
    assert line == (f"Error: {copy}: tokenizer tokenizer.json has {n} tokens, the model's vocabulary 262144; "
                    "it is not this model's tokenizer")
    with pytest.raises(ArtifactError, match="not this model's tokenizer"):
        open_artifact(copy)


def test_tokenizer_that_is_not_gemma(copy):
    small_tokenizer(copy / "tokenizer.json", specials=("[PAD]", "[CLS]"))
    resign(copy, "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer has no <bos> token; not a Gemma tokenizer"):
        open_artifact(copy)
    assert verify_error(copy).endswith("not a Gemma tokenizer")
