"""Shared test constants and helpers (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from gemma_export.artifact import read_manifest, sha256_file, write_manifest
from gemma_export.loading import ModelSpec

T, CTX = 16, 256  # the tiny artifacts' prefill length and context (window 16: the text runs far past it)
TINY = ModelSpec("tiny", random_weights=True, seed=0, max_context=CTX)
FORMATS = ("onnx", "tflite", "pte")
TEXT = Path(__file__).parent / "data" / "gpl-3.txt"


def cli(*args):
    from gemma_export.cli import cli as group

    return CliRunner().invoke(group, [str(a) for a in args])


def random_ids(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, 262_144, size=n).tolist()


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def resign(folder: Path) -> None:
    """Rewrite the manifest's sizes and hashes for the files as they are now, so that only parity
    (not integrity) can catch a change."""
    write_manifest(folder, read_manifest(folder))


def resign_file(folder: Path, name: str) -> None:
    """Record one changed file's size and hash in the raw manifest (the others as they were)."""
    m = json.loads((folder / "manifest.json").read_text())
    m["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))


def plant(artifact: Path, weight: np.ndarray, factor: float = 3.0, files=None) -> str:
    """Plant a fault: scale one weight matrix's raw fp32 bytes (as stored, or transposed) in the
    model files (or `files`, named in the artifact), then re-sign the manifest. The artifact loads
    and runs but computes one layer wrong, like a faulty port."""
    m = read_manifest(artifact)
    files = [artifact / f for f in (files or (m.program["file"], m.program.get("external_data"))) if f]
    for layout, arr in (("as stored", weight), ("transposed", weight.T)):
        needle = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        for path in files:
            data = bytearray(path.read_bytes())
            at = data.find(needle)
            if at >= 0:
                data[at:at + len(needle)] = (np.frombuffer(needle, np.float32) * factor).tobytes()
                path.write_bytes(bytes(data))
                resign(artifact)
                return f"{path.name} ({layout})"
    raise AssertionError("weight bytes not found in the artifact")


def write_hf_folder(model, folder, shards=1, prefix="model."):
    """Save a model the way Hugging Face does: config.json + (sharded) safetensors + tokenizer."""
    import shutil

    from safetensors.torch import save_file

    from gemma_export.gemma3.reference import hf_config
    from gemma_export.loading import tokenizer_for

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
    shutil.copy(tokenizer_for("preset", None), folder / "tokenizer.json")
    return folder


def small_tokenizer(path, specials=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")):
    """A tiny word-level tokenizer.json (with or without Gemma's special tokens); returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*specials, "<unk>", "the", "capital", "of", "France", "is"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return len(vocab)


def logits(model, ids, prefill_len: int = 16):
    """All logits of `ids` through the eager model in full prefill chunks."""
    from gemma_export.session import TorchSession, feed

    return np.concatenate([lg for _, lg in feed(TorchSession(model, prefill_len=prefill_len), ids)])


def load_error(path) -> str:
    """Loading `path` fails with one CheckpointError line; returns it."""
    import pytest

    from gemma_export.errors import CheckpointError
    from gemma_export.loading import load

    with pytest.raises(CheckpointError) as e:
        load(ModelSpec(str(path), max_context=256))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def tiny_gguf(path: Path, kind_of) -> Path:
    """The tiny random model written as a GGUF of block types (`kind_of(gguf name, array)`), with
    the bundled GGUF's tokenizer: a source that holds codes, made by gguf's own quantizer."""
    from gemma_export.gemma3.config import preset
    from gemma_export.loading import bundled_gguf
    from gemma_export.loading.load import random_model
    from gemma_export.quant import source

    cfg = preset("tiny")
    model = random_model(cfg, seed=0, max_context=CTX)
    p = "gemma3."
    overrides = {p + "context_length": cfg.max_position_embeddings, p + "embedding_length": cfg.hidden_size,
                 p + "block_count": cfg.num_layers, p + "feed_forward_length": cfg.intermediate_size,
                 p + "attention.head_count": cfg.num_heads, p + "attention.head_count_kv": cfg.num_kv_heads,
                 p + "attention.key_length": cfg.head_dim, p + "attention.value_length": cfg.head_dim,
                 p + "attention.sliding_window": cfg.sliding_window}
    return source.write_gguf(bundled_gguf(), path, source.model_tensors(model), kind_of, overrides)


def write_hf_multimodal(model, folder, seed=1, vision_cfg=None):
    """transformers' own save of a multimodal Gemma 3 holding `model` and a random vision encoder
    (our weights; the tiny one unless `vision_cfg`), with the bundled tokenizer."""
    import shutil

    from gemma_export.gemma3.reference import hf_multimodal_from
    from gemma_export.gemma3.vision import random_vision, vision_preset
    from gemma_export.loading import tokenizer_for

    vision = random_vision(vision_cfg or vision_preset("tiny"), seed=seed)
    hf_multimodal_from(model, vision).save_pretrained(folder)
    shutil.copy(tokenizer_for("preset", None), folder / "tokenizer.json")
    return folder


# llama.cpp's mmproj tensor names for Gemma 3, written out here (not taken from the gguf package's
# name map, which the reader uses) so the test checks the reader against the layout itself
_MMPROJ_TOWER = {"embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
                 "post_layernorm": "v.post_ln"}
_MMPROJ_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
                 "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def write_mmproj(vision, path: Path, legacy_mlp_names: bool = False, projection_f16: bool = True,
                 projector_type: str = "gemma3") -> Path:
    """`vision` (our Gemma3Vision) as llama.cpp's converter writes an mmproj GGUF: clip.* metadata,
    v.* / mm.* names, the projector norm stored as 1 + w, the input projection in F16 and the
    embeddings in F32. `legacy_mlp_names`: fc1 named ffn_down, as early conversions did."""
    import gguf

    c = vision.cfg
    block = dict(_MMPROJ_BLOCK)
    if legacy_mlp_names:
        block["mlp.fc1"], block["mlp.fc2"] = "ffn_down", "ffn_up"
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_clip_projector_type(projector_type)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_image_size(c.image_size)
    w.add_vision_patch_size(c.patch_size)
    w.add_vision_embedding_length(c.hidden_size)
    w.add_vision_feed_forward_length(c.intermediate_size)
    w.add_vision_block_count(c.num_layers)
    w.add_vision_head_count(c.num_heads)
    w.add_vision_attention_layernorm_eps(c.layer_norm_eps)
    w.add_vision_projection_dim(c.text_hidden_size)
    if c.pool != 4:
        w.add_vision_projector_scale_factor(c.pool)
    for name, p in vision.state_dict().items():
        arr = p.detach().float().numpy()
        stem, _, suffix = name.rpartition(".")
        if name == "projector.mm_input_projection_weight":
            w.add_tensor("mm.input_projection.weight", arr.astype(np.float16 if projection_f16 else np.float32))
            continue
        if name == "projector.mm_soft_emb_norm.weight":
            w.add_tensor("mm.soft_emb_norm.weight", arr + 1.0)
            continue
        if stem.startswith("encoder.layers."):
            _, _, i, module = stem.split(".", 3)
            gname = f"v.blk.{i}.{block[module]}.{suffix}"
        else:
            gname = f"{_MMPROJ_TOWER[stem]}.{suffix}"
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
