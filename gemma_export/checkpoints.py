"""Reading checkpoints without unpickling and without holding weights twice.

Two formats: Hugging Face folders (config.json + *.safetensors, sharded or not) and GGUF files.
Each reader returns a `Gemma3Config` and an iterator of (our parameter name, tensor) pairs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .config import GLOBAL, SLIDING, Gemma3Config
from .errors import CheckpointError

# ----------------------------------------------------------------------------------------------
# Hugging Face folders
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, "bfloat16"),
    "F64": (np.float64, None), "I64": (np.int64, None), "I32": (np.int32, None),
}
_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_SKIP_PREFIXES = ("vision_tower", "multi_modal_projector", "model.vision_tower", "model.multi_modal_projector")


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header (claims {n} bytes)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        end = info["data_offsets"][1]
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end}, "
                f"file has {size}"
            )
    return header, data_start


def iter_safetensors(path: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield (name, tensor) with tensors backed by a copy-on-write mmap of the file."""
    import torch

    header, data_start = _read_safetensors_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="c")
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        np_dtype, torch_view = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        arr = mm[data_start + start : data_start + end].view(np_dtype).reshape(info["shape"])
        t = torch.from_numpy(arr)
        if torch_view == "bfloat16":
            t = t.view(torch.bfloat16)
        yield name, t


def _hf_text_config(raw: dict) -> dict:
    return raw.get("text_config", raw) if isinstance(raw.get("text_config"), dict) else raw


def config_from_hf(raw: dict, name: str) -> Gemma3Config:
    c = _hf_text_config(raw)
    try:
        hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        rope_global, rope_local, scaling = 1_000_000.0, 10_000.0, 1.0
        params = c.get("rope_parameters")
        if isinstance(params, dict) and "full_attention" in params:  # transformers 5 layout
            rope_global = float(params["full_attention"].get("rope_theta", rope_global))
            if params["full_attention"].get("rope_type") == "linear":
                scaling = float(params["full_attention"].get("factor", 1.0))
            rope_local = float(params.get("sliding_attention", {}).get("rope_theta", rope_local))
        else:
            rope_global = float(c.get("rope_theta", rope_global))
            rope_local = float(c.get("rope_local_base_freq", rope_local))
            rs = c.get("rope_scaling") or {}
            if rs.get("rope_type", rs.get("type")) == "linear":
                scaling = float(rs.get("factor", 1.0))
        layer_types = tuple(
            GLOBAL if t == "full_attention" else SLIDING for t in c.get("layer_types") or ()
        )
        head_dim = int(c.get("head_dim") or hidden // heads)
        return Gemma3Config(
            name=name,
            vocab_size=int(c.get("vocab_size", 262_144)),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads", heads)),
            head_dim=head_dim,
            query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", head_dim)),
            sliding_window=int(c.get("sliding_window", 512)),
            max_position_embeddings=int(c.get("max_position_embeddings", 32_768)),
            rope_local_base=rope_local,
            rope_global_base=rope_global,
            rope_global_scaling=scaling,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            global_every=int(c.get("sliding_window_pattern", 6)),
            layer_types=layer_types,
        )
    except KeyError as e:
        raise CheckpointError(f"config.json of {name}: missing field {e.args[0]!r}") from None


def _hf_param_name(key: str) -> str | None:
    if key.startswith(_SKIP_PREFIXES) or key == "lm_head.weight":
        return None  # vision parts; the output head is tied to the embedding
    for prefix in _HF_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_hf_folder(folder: Path) -> tuple[Gemma3Config, Iterator]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (a Hugging Face checkpoint folder needs one)")
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if pickles:
            raise CheckpointError(
                f"{folder / pickles[0]}: pickle checkpoints are refused (unpickling runs code); "
                "convert it to safetensors"
            )
        raise CheckpointError(f"{folder}: no *.safetensors files")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wanted = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [w for w in wanted if not (folder / w).is_file()]
        if missing:
            raise CheckpointError(f"{folder / missing[0]}: shard listed in the index is missing")
        shards = [folder / w for w in wanted]
    for shard in shards:  # check every header before loading anything
        _read_safetensors_header(shard)
    cfg = config_from_hf(raw, folder.name)

    def tensors():
        for shard in shards:
            for key, t in iter_safetensors(shard):
                name = _hf_param_name(key)
                if name is not None:
                    yield name, t, shard

    return cfg, tensors()


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _gguf_param_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "embed_tokens.weight"
    if name == "output_norm.weight":
        return "norm.weight"
    if name == "output.weight":
        return None  # tied
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return name


def _open_gguf(path: Path):
    import gguf

    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/... on truncation
        raise CheckpointError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: truncated GGUF: tensor {t.name!r} runs past the end of the file")
    return reader


def config_from_gguf(reader, name: str) -> Gemma3Config:
    fields = reader.fields

    def get(key, default=None):
        f = fields.get(key)
        return f.contents() if f is not None else default

    arch = get("general.architecture")
    if arch != "gemma3":
        raise CheckpointError(f"{name}: GGUF architecture is {arch!r}, expected 'gemma3'")
    p = f"{arch}."
    hidden = int(get(p + "embedding_length"))
    heads = int(get(p + "attention.head_count"))
    head_dim = int(get(p + "attention.key_length", hidden // heads))
    layers = int(get(p + "block_count"))
    scaling = 1.0
    if get(p + "rope.scaling.type") == "linear":
        scaling = float(get(p + "rope.scaling.factor", 1.0))
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else 262_144
    # llama.cpp's rule: the 27B scales queries by hidden/heads, every other size by head_dim.
    qpas = hidden / heads if layers == 62 else head_dim
    return Gemma3Config(
        name=name,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get(p + "feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(get(p + "attention.head_count_kv", heads)),
        head_dim=head_dim,
        query_pre_attn_scalar=float(qpas),
        sliding_window=int(get(p + "attention.sliding_window", 512)),
        max_position_embeddings=int(get(p + "context_length", 32_768)),
        rope_global_base=float(get(p + "rope.freq_base", 1_000_000.0)),
        rope_global_scaling=scaling,
        rms_norm_eps=float(get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        bos_token_id=int(get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(get("tokenizer.ggml.padding_token_id", 0)),
    )


def read_gguf(path: Path) -> tuple[Gemma3Config, Iterator]:
    import gguf
    import torch

    reader = _open_gguf(path)
    try:
        cfg = config_from_gguf(reader, path.stem)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: GGUF metadata incomplete ({e})") from None

    def tensors():
        for t in reader.tensors:
            name = _gguf_param_name(t.name)
            if name is None:
                continue
            arr = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            if not arr.flags.writeable:  # unquantized tensors come back as views of the file
                arr = arr.copy()
            tensor = torch.from_numpy(arr)
            if name.endswith("norm.weight"):
                tensor = tensor - 1.0  # GGUF stores Gemma norm weights as 1 + w
            yield name, tensor, path

    return cfg, tensors()
