"""Export formats. One module per format, looked up by name in this explicit table.

Each module offers the same small protocol:
  FORMAT: str                                  name used on the command line and in manifests
  check(recipe) -> None                        raises UnsupportedError before any work starts
  export(model, request, workdir) -> dict      writes model files into workdir, returns manifest parts
  open(artifact_dir, manifest, threads) -> Session
"""

from __future__ import annotations

import importlib

from gemma_export.errors import BackendMissingError, ConfigError, UnsupportedError

FORMATS = {
    "pte": "converters.executorch",
    "onnx": "converters.onnx",
    "tflite": "converters.tflite",
}


# What each format can lower today: (format -> recipes). Quantized recipes run in PyTorch
# (`gemma-export eval --recipe`); lowering their codes into each format is not done yet.
SUPPORTED_RECIPES = {
    # XNNPACK lowers integer weights only with int8 dynamic activations (no int8-weights)
    "pte": ("fp32", "int8", "int4-b32", "int4-b128", "int4-b32-rtn", "int4-b128-rtn"),
    "onnx": ("fp32", "int8", "int8-weights", "int4-b32", "int4-b128", "int4-b32-rtn", "int4-b128-rtn"),
    "tflite": ("fp32",),
}


def check_recipe(fmt: str, request) -> None:
    """Refuse an unsupported (format, recipe) pair before any work starts."""
    supported = SUPPORTED_RECIPES[fmt]
    if request.recipe not in supported:
        raise UnsupportedError(
            f"format {fmt} does not support recipe {request.recipe!r} (supported: {', '.join(supported)})"
        )


def get(name: str):
    if name not in FORMATS:
        raise ConfigError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[name])
    except ImportError as e:
        raise BackendMissingError(f"format {name} needs a package that is not installed: {e.name}") from None
