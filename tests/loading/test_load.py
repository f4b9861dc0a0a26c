"""Model references -> loaded models: presets, random weights, Hugging Face folders, refusals."""

import numpy as np
import pytest
import torch

from gemma_export.errors import CheckpointError, ConfigError
from gemma_export.gemma3.config import preset
from gemma_export.loading import ModelSpec, load, read_config
from helpers import load_error, logits, write_hf_folder


@pytest.mark.parametrize("shards,prefix", [(1, "model."), (3, "model."), (2, "model.language_model.")])
def test_hf_folder_loads_bit_identical(tiny, tmp_path, shards, prefix):
    folder = write_hf_folder(tiny, tmp_path / "ckpt", shards, prefix)
    loaded = load(ModelSpec(str(folder), max_context=256))
    same = {"name": "x", "global_every": 0}  # derived fields; layer_types is compared
    assert loaded.config.to_dict() | same == tiny.cfg.to_dict() | same
    for (n, a), (_, b) in zip(sorted(tiny.state_dict().items()), sorted(loaded.model.state_dict().items())):
        assert torch.equal(a, b), n
    ids = list(range(5, 45))
    assert np.array_equal(logits(tiny, ids), logits(loaded.model, ids))
    assert read_config(str(folder)).to_dict() | same == tiny.cfg.to_dict() | same


def test_hf_folder_weights_are_memory_mapped(tiny, tmp_path):
    folder = write_hf_folder(tiny, tmp_path / "ckpt")
    loaded = load(ModelSpec(str(folder), max_context=256))
    emb = loaded.model.embed_tokens.weight
    # a tensor backed by the file mapping, not a private heap copy: its storage is not resizable
    assert not emb.untyped_storage().resizable()


def test_random_weights_are_seeded(tiny):
    again = load(ModelSpec("tiny", random_weights=True, seed=0, max_context=256)).model
    other = load(ModelSpec("tiny", random_weights=True, seed=1, max_context=256)).model
    assert torch.equal(again.layers[1].mlp.up_proj.weight, tiny.layers[1].mlp.up_proj.weight)
    assert not torch.equal(other.layers[1].mlp.up_proj.weight, tiny.layers[1].mlp.up_proj.weight)
    assert again.lm_head.weight is again.embed_tokens.weight  # tied


def test_missing_file(tmp_path):
    assert "no such preset, folder or file" in load_error(tmp_path / "nope.gguf")


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    msg = load_error(tmp_path / "pytorch_model.bin")
    assert "pytorch_model.bin" in msg and "pickle" in msg
    (tmp_path / "config.json").write_text("{}")
    assert "pickle" in load_error(tmp_path)


def test_preset_without_weights_needs_random_weights():
    with pytest.raises(CheckpointError, match="--random-weights"):
        load(ModelSpec("gemma3-1b"))
    assert read_config("gemma3-1b") == preset("gemma3-1b")


def test_spec_is_validated():
    with pytest.raises(ConfigError, match="dtype"):
        ModelSpec("tiny", dtype="int3")
    with pytest.raises(ConfigError, match="max context"):
        load(ModelSpec("tiny", random_weights=True, max_context=99_999))
