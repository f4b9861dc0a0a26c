"""Loading HF folders and GGUF files, and one clear error for each kind of bad checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from gemma_export.cli import cli
from gemma_export.errors import CheckpointError
from gemma_export.loading import ModelSpec, bundled_gguf, load
from gemma_export.reference import hf_config
from gemma_export.session import TorchSession, feed


def write_hf_folder(model, folder, shards=1, prefix="model."):
    """Save a model the way Hugging Face does: config.json + (sharded) safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(model.cfg).to_dict()
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    names = sorted(state)
    parts = np.array_split(np.arange(len(names)), shards)
    weight_map = {}
    for i, idx in enumerate(parts):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: state[names[j]] for j in idx}, str(folder / fname))
        weight_map.update({names[j]: fname for j in idx})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tok = bundled_tokenizer()
    shutil.copy(tok, folder / "tokenizer.json")
    return folder


def bundled_tokenizer():
    from gemma_export.loading import tokenizer_for

    return tokenizer_for("preset", None)


def logits(model, ids):
    s = TorchSession(model, prefill_len=16)
    return np.concatenate([lg for _, lg in feed(s, ids)])


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


def test_hf_folder_weights_are_memory_mapped(tiny, tmp_path):
    folder = write_hf_folder(tiny, tmp_path / "ckpt")
    loaded = load(ModelSpec(str(folder), max_context=256))
    emb = loaded.model.embed_tokens.weight
    # a tensor backed by the file mapping, not a private heap copy: its storage is not resizable
    assert not emb.untyped_storage().resizable()


def test_gguf_config_read_from_file(real):
    cfg = real.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.sliding_window) == (18, 640, 1, 512)
    assert cfg.layer_types.count("global") == 3


def _cli_error(*args):
    res = CliRunner().invoke(cli, ["inspect", *args])
    return res.exit_code, res.output.strip()


def _load_error(path):
    with pytest.raises(CheckpointError) as e:
        load(ModelSpec(str(path), max_context=256))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    assert "no such preset, folder or file" in _load_error(tmp_path / "nope.gguf")


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    msg = _load_error(tmp_path / "pytorch_model.bin")
    assert "pytorch_model.bin" in msg and "pickle" in msg
    (tmp_path / "config.json").write_text("{}")
    assert "pickle" in _load_error(tmp_path)


def test_truncated_safetensors(tiny, tmp_path):
    folder = write_hf_folder(tiny, tmp_path / "ckpt")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = _load_error(folder)
    assert "model.safetensors" in msg and "truncated" in msg


def test_config_that_does_not_match_tensors(tiny, tmp_path):
    folder = write_hf_folder(tiny, tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(folder)
    assert "config does not match tensors" in msg and "mlp" in msg


def test_missing_shard(tiny, tmp_path):
    folder = write_hf_folder(tiny, tmp_path / "ckpt", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert "missing" in _load_error(folder)


def test_truncated_gguf(tmp_path):
    src = bundled_gguf()
    bad = tmp_path / "cut.gguf"
    with src.open("rb") as f:
        bad.write_bytes(f.read(50_000_000))
    msg = _load_error(bad)
    assert "cut.gguf" in msg and "truncated" in msg


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"hello world" * 100)
    assert "not a GGUF" in _load_error(bad)


def test_cli_reports_bad_checkpoint_as_one_line(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    code, out = _cli_error(str(tmp_path / "w.bin"))
    assert code == 1
    assert out.startswith("Error: ") and "pickle" in out and len(out.splitlines()) == 1
