"""Checkpoint readers: one clear error for each kind of bad safetensors folder or GGUF file."""

import json

import pytest

from gemma_export.loading import bundled_gguf
from helpers import load_error, write_hf_folder


@pytest.mark.slow
def test_gguf_config_read_from_file(real):
    cfg = real.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.sliding_window) == (18, 640, 1, 512)
    assert cfg.layer_types.count("global") == 3


def test_truncated_safetensors(tiny, tmp_path):
    folder = write_hf_folder(tiny, tmp_path / "ckpt")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = load_error(folder)
    assert "model.safetensors" in msg and "truncated" in msg


def test_config_that_does_not_match_tensors(tiny, tmp_path):
    folder = write_hf_folder(tiny, tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = load_error(folder)
    assert "config does not match tensors" in msg and "mlp" in msg


def test_missing_shard(tiny, tmp_path):
    folder = write_hf_folder(tiny, tmp_path / "ckpt", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert "missing" in load_error(folder)


@pytest.mark.slow
def test_truncated_gguf(tmp_path):
    src = bundled_gguf()
    bad = tmp_path / "cut.gguf"
    with src.open("rb") as f:
        bad.write_bytes(f.read(50_000_000))
    msg = load_error(bad)
    assert "cut.gguf" in msg and "truncated" in msg


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"hello world" * 100)
    assert "not a GGUF" in load_error(bad)
