"""llama.cpp's vision file for Gemma 3 (an "mmproj" GGUF): the SigLIP tower and projector that
llama.cpp keeps beside the text GGUF, read into Hugging Face tensor names so the vision loader
takes them like a checkpoint folder's.

The layout is the one llama.cpp's converter writes: `clip.*` metadata (projector type `gemma3`,
the tower's sizes, the projection width), tensor names from the gguf package's own name map
(`v.blk.N.attn_q`, `v.patch_embd`, `mm.input_projection`, ...), and the projector's RMSNorm weight
stored with its 1 added (llama.cpp's norm multiplies by w, Gemma's by 1 + w). Files converted before
the name map existed name the two MLP matrices the other way round; which is which is read from
their shapes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..gemma3.vision import VisionConfig
from .checkpoints import _open_gguf  # the checked reader, reused while the file is unchanged

PROJECTOR = "gemma3"
_SOFT_NORM = "multi_modal_projector.mm_soft_emb_norm.weight"
_IN_PROJ = "multi_modal_projector.mm_input_projection_weight"


def _hf_names(vc: VisionConfig) -> list[str]:
    """Every Hugging Face tensor name of the tower and projector at `vc`'s depth."""
    tower = "vision_tower.vision_model."
    names = [tower + n for n in ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
                                 "embeddings.position_embedding.weight", "post_layernorm.weight",
                                 "post_layernorm.bias")]
    for i in range(vc.num_layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"{tower}encoder.layers.{i}.{m}.weight", f"{tower}encoder.layers.{i}.{m}.bias"]
    return names + [_IN_PROJ, _SOFT_NORM]


def gguf_names(vc: VisionConfig) -> dict[str, str]:
    """{Hugging Face name: mmproj tensor name}, by the gguf package's name map (the one llama.cpp's
    converter uses)."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vc.num_layers)
    out = {}
    for hf in _hf_names(vc):
        # the converter first renames the projector's `..._weight` parameter to `....weight`
        key = hf.replace("mm_input_projection_weight", "mm_input_projection.weight")
        stem, _, suffix = key.rpartition(".")
        mapped = table.get_name(stem)
        if mapped is None:
            raise CheckpointError(f"this gguf package maps no mmproj tensor name for {hf}")
        out[hf] = f"{mapped}.{suffix}"
    return out


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.parts[f.data[0]] if f.data else None
    if value is None:
        return default
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode("utf-8", "replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def read_config(path: Path) -> VisionConfig:
    """The vision config an mmproj file declares (Gemma 3's image token ids: its text GGUF's)."""
    import gguf

    reader = _open_gguf(path)
    keys, vk = gguf.Keys.Clip, gguf.Keys.ClipVision
    kind = _field(reader, keys.PROJECTOR_TYPE) or _field(reader, "clip.vision.projector_type")
    if kind != PROJECTOR:
        raise CheckpointError(f"{path}: an mmproj file for projector {kind!r}; Gemma 3's is {PROJECTOR!r}")
    if _field(reader, keys.HAS_VISION_ENCODER, True) is False:
        raise CheckpointError(f"{path}: the mmproj file holds no vision encoder")

    def need(key):
        value = _field(reader, key)
        if value is None:
            raise CheckpointError(f"{path}: the mmproj file lacks {key}")
        return value

    image, patch = int(need(vk.IMAGE_SIZE)), int(need(vk.PATCH_SIZE))
    scale = int(_field(reader, vk.Projector.SCALE_FACTOR, 4))  # patches pooled per side (the converter's default)
    side = (image // patch) // scale
    try:
        return VisionConfig(name=path.stem, image_size=image, patch_size=patch,
                            hidden_size=int(need(vk.EMBEDDING_LENGTH)),
                            intermediate_size=int(need(vk.FEED_FORWARD_LENGTH)),
                            num_layers=int(need(vk.BLOCK_COUNT)), num_heads=int(need(vk.Attention.HEAD_COUNT)),
                            # stored as float32: its shortest decimal is the value written
                            layer_norm_eps=float(str(np.float32(_field(reader, vk.Attention.LAYERNORM_EPS, 1e-6)))),
                            tokens_per_image=side * side, text_hidden_size=int(need(vk.PROJECTION_DIM)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: inconsistent vision sizes in the mmproj metadata ({e})") from None


def tensors(path: Path, vc: VisionConfig) -> Iterator[tuple[str, "object", Path]]:
    """(Hugging Face name, fp32 torch tensor, path) for every tensor of the tower and projector."""
    import gguf
    import torch

    reader = _open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}
    names = gguf_names(vc)
    missing = [g for g in names.values() if g not in by_name]
    if missing:
        raise CheckpointError(f"{path}: the mmproj file lacks {missing[0]} (and {len(missing) - 1} more)"
                              if len(missing) > 1 else f"{path}: the mmproj file lacks {missing[0]}")
    swapped = _mlp_swapped(by_name, names, vc)
    for hf, g in names.items():
        if swapped and re.search(r"\.mlp\.fc[12]\.", hf):
            g = g.replace("ffn_up", "\0").replace("ffn_down", "ffn_up").replace("\0", "ffn_down")
        t = by_name[g]
        try:
            arr = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {g} is stored as {t.tensor_type.name}, which the gguf package "
                                  "cannot dequantize") from None
        if hf == _SOFT_NORM:
            arr = arr - 1.0
        yield hf, torch.from_numpy(arr), path


def _mlp_swapped(by_name: dict, names: dict, vc: VisionConfig) -> bool:
    """Whether the file names fc1 (hidden -> intermediate) `ffn_down`, as early conversions did."""
    fc1 = names["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"]
    shape = tuple(int(d) for d in reversed(by_name[fc1].shape))  # GGUF lists dimensions innermost first
    return shape == (vc.hidden_size, vc.intermediate_size) != (vc.intermediate_size, vc.hidden_size)
