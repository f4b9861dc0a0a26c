"""Property-based fuzzing of the readers a user points at files: a safetensors checkpoint folder, a
GGUF file and an artifact's manifest. Whatever the bytes, reading either succeeds or raises our
one-line typed error; no other exception type escapes. Small files, a few thousand cases each,
derandomized so a failure reproduces."""

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_export.artifact import read_manifest
from gemma_export.errors import ExportError
from gemma_export.loading.checkpoints import read_gguf, read_hf_folder
from helpers import load_error

FUZZ = settings(max_examples=800, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

CONFIG = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 4, "hidden_size": 8,
          "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
          "head_dim": 8, "sliding_window": 4, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A valid small safetensors file, GGUF file and manifest to mutate."""
    import gguf
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("seeds")
    save_file({"model.embed_tokens.weight": np.ones((4, 8), np.float32), "model.norm.weight": np.ones(8, np.float16)},
              str(root / "model.safetensors"))
    w = gguf.GGUFWriter(str(root / "m.gguf"), "gemma3")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"safetensors": (root / "model.safetensors").read_bytes(), "gguf": (root / "m.gguf").read_bytes()}


@pytest.fixture(scope="module")
def manifest_doc(artifacts):
    return json.loads((artifacts.get("onnx") / "manifest.json").read_text())


def mutated(seed_key):
    """Bytes of a seed file with flips, a truncation, an overwritten header region or an insertion."""
    @st.composite
    def build(draw, seeds):
        data = bytearray(seeds[seed_key])
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["flip", "truncate", "header", "insert"]))
            if kind == "flip" and data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] = draw(st.integers(0, 255))
            elif kind == "truncate":
                data = data[:draw(st.integers(0, len(data)))]
            elif kind == "header" and data:
                i = draw(st.integers(0, min(len(data), 96) - 1))
                data[i:i + 8] = draw(st.binary(min_size=8, max_size=8))
            else:
                i = draw(st.integers(0, len(data)))
                data[i:i] = draw(st.binary(min_size=1, max_size=16))
        return bytes(data)
    return build


def read_only_ours(read):
    try:
        read()
    except ExportError as e:
        assert "\n" not in str(e)


def test_safetensors_folder_reader(seeds, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))

    def read():
        _, tensors = read_hf_folder(folder)
        for _ in tensors:
            pass

    @FUZZ
    @given(data=mutated("safetensors")(seeds))
    def fuzz(data):
        (folder / "model.safetensors").write_bytes(data)
        read_only_ours(read)

    fuzz()

    json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=8)

    @FUZZ
    @given(header=st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), json_values, max_size=3),
           config_key=st.sampled_from(sorted(CONFIG)), config_value=json_values)
    def fuzz_structure(header, config_key, config_value):
        raw = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
        (folder / "config.json").write_text(json.dumps({**CONFIG, config_key: config_value}))
        read_only_ours(read)

    fuzz_structure()


def test_gguf_reader(seeds, tmp_path):
    path = tmp_path / "m.gguf"

    @FUZZ
    @given(data=mutated("gguf")(seeds))
    def fuzz(data):
        path.write_bytes(data)

        def read():
            _, tensors = read_gguf(path)
            for _ in tensors:
                pass
        read_only_ours(read)

    fuzz()


def test_manifest_reader(manifest_doc, tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    text = json.dumps(manifest_doc)
    leaves = st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=True) | st.text(max_size=6)
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                              max_size=3), max_leaves=6)
    paths = [[k] for k in manifest_doc] + [[k, sub] for k, v in manifest_doc.items() if isinstance(v, dict) for sub in v]

    @FUZZ
    @given(where=st.sampled_from(paths), value=values, drop=st.booleans())
    def fuzz_fields(where, value, drop):
        doc = json.loads(text)
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        if drop:
            parent.pop(where[-1], None)
        else:
            parent[where[-1]] = value
        (folder / "manifest.json").write_text(json.dumps(doc))
        read_only_ours(lambda: read_manifest(folder))

    @FUZZ
    @given(cut=st.integers(0, len(text)), junk=st.text(max_size=4))
    def fuzz_text(cut, junk):
        (folder / "manifest.json").write_text(text[:cut] + junk + text[cut + len(junk):])
        read_only_ours(lambda: read_manifest(folder))

    fuzz_fields()
    fuzz_text()


def test_named_corruptions_each_give_their_own_line(seeds, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    good = seeds["safetensors"]
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    (folder / "model.safetensors").write_bytes(good[:8] + b"{not json" + good[17:])
    assert "corrupt safetensors header (not JSON)" in load_error(folder)
    header["model.norm.weight"]["data_offsets"] = [0, 10**9]
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + good[8 + n:])
    assert "corrupt safetensors header: tensor 'model.norm.weight' spans" in load_error(folder)
    g, path = seeds["gguf"], tmp_path / "m.gguf"
    for data, expected in ((b"GGML" + g[4:], "not a GGUF file (bad magic)"),
                           (g[:4] + struct.pack("<I", 7) + g[8:], "GGUF version 7; versions 2 and 3 are read"),
                           (g[:8] + struct.pack("<Q", 10**9) + g[16:], "corrupt GGUF header: 1,000,000,000 tensors")):
        path.write_bytes(data)
        assert expected in load_error(path)
