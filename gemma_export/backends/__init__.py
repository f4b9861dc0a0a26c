"""Backends: one module per format or target, behind one protocol (`base.Backend`).

The table below is the registry: a new backend is one module exposing `BACKEND` plus one line
here. Modules are imported when first asked for, so naming the formats imports no backend.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError, UnsupportedError
from ..quant.recipes import PRESETS
from .base import Backend

REGISTRY = {
    "pte": "gemma_export.backends.executorch",
    "onnx": "gemma_export.backends.onnx",
    "tflite": "gemma_export.backends.tflite",
    "qnn": "gemma_export.backends.qnn",
}
# the formats for a CPU (what `--format all` exports); the rest are NPU targets, named one by one
NAMES = ("pte", "onnx", "tflite")
TARGETS = tuple(n for n in REGISTRY if n not in NAMES)
# the runtime each format's folder is made for, accepted as the format's name
ALIASES = {"ort-genai": "onnx", "litertlm": "tflite", "executorch": "pte"}


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in REGISTRY:
        raise ConfigError(f"unknown format {name!r}; known: {', '.join(REGISTRY)} "
                          f"(or {', '.join(f'{a} = {n}' for a, n in ALIASES.items())})")
    return name


def get(name: str) -> Backend:
    return importlib.import_module(REGISTRY[canonical(name)]).BACKEND


def check_support(name: str, recipe) -> None:
    """Refuse an unsupported (format, recipe) pair before any work starts (recipe: a QuantRecipe)."""
    reason = get(name).lowering.refusal(recipe)
    if reason:
        raise UnsupportedError(f"format {name} does not support recipe {recipe.name!r}: cannot lower {reason}")


def supported_presets(name: str) -> list[str]:
    lowering = get(name).lowering
    return [n for n, r in PRESETS.items() if lowering.refusal(r) is None]
