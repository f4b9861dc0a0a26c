"""Library entry points used by the CLI: resolve a model reference to a config or a session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import PRESETS, Gemma3Config
from .package import MANIFEST, read_manifest
from .tokenizer import Tokenizer


def is_artifact(ref: str) -> bool:
    return (Path(ref) / MANIFEST).is_file()


def read_config(ref: str) -> Gemma3Config:
    """The model config behind any reference, without loading weights."""
    from .checkpoints import _open_gguf, config_from_gguf
    from .loading import describe

    if ref in PRESETS:
        return PRESETS[ref]
    if is_artifact(ref):
        return Gemma3Config.from_dict(read_manifest(ref)["model"]["config"])
    kind, path = describe(ref)
    if kind == "gguf":
        return config_from_gguf(_open_gguf(path), path.stem)
    from .checkpoints import read_hf_folder

    cfg, _ = read_hf_folder(path)
    return cfg


@dataclass
class Opened:
    session: object
    tokenizer: Tokenizer
    description: str


def open_session(ref: str, random_weights=False, seed=0, max_context=None, prefill_len=128, threads=2,
                 dtype="float32", recipe="fp32", progress=lambda m: None) -> Opened:
    """A Session for a PyTorch model reference or an exported artifact folder."""
    import torch

    torch.set_num_threads(threads)
    if is_artifact(ref):
        from .package import open_artifact

        return open_artifact(ref, threads)
    from .loading import ModelSpec, load
    from .session import TorchSession

    loaded = load(ModelSpec(ref, random_weights, seed, max_context, dtype))
    tok = Tokenizer(loaded.tokenizer_path)
    description = loaded.source
    if recipe != "fp32":
        q = quantize_model(loaded.model, recipe, tok, progress)
        description += f" quantized in PyTorch (recipe {q['recipe']['name']})"
    session = TorchSession(loaded.model, prefill_len=prefill_len)
    return Opened(session, tok, description)


def quantize_model(model, recipe_ref, tokenizer, progress=lambda m: None) -> dict:
    """Quantize in place with a recipe (preset or file), calibrating on the bundled corpus.

    Returns what the manifest records: the recipe, the calibration set's sha256, the schemes.
    """
    import calibration

    from .quantize import quantize_
    from .recipes import resolve

    recipe = resolve(recipe_ref)
    data, digest = None, None
    if recipe.needs_calibration:
        c = recipe.calibration
        # a sample never runs past the model's context (tiny test models have short ones)
        data, digest = calibration.build(tokenizer, c.samples, min(c.seq_len, model.max_context), c.seed)
    schemes = quantize_(model, recipe, data, progress)
    return {"recipe": recipe.to_dict(), "calibration_sha256": digest, "quantized_modules": len(schemes),
            "thresholds": recipe.thresholds.to_dict()}
