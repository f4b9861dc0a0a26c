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


# What each format can lower today: (format -> recipes), checked before any work starts.
SUPPORTED_RECIPES = {
    "pte": ("fp32",),
    "onnx": ("fp32",),
    "tflite": ("fp32",),
}
# Quantized lowering that writes the exact PyTorch codes into the file (tested bit for bit), but
# whose parity on real weights is not yet within the recipes' thresholds (activation quantization
# rounds differently per runtime). Opt in with GEMMA_EXPORT_EXPERIMENTAL=1.
EXPERIMENTAL_RECIPES = {
    "pte": ("int8", "int4-b32", "int4-b128", "int4-b32-rtn", "int4-b128-rtn"),
    "onnx": ("int8", "int8-weights", "int4-b32", "int4-b128", "int4-b32-rtn", "int4-b128-rtn"),
    "tflite": (),
}
EXPERIMENTAL_ENV = "GEMMA_EXPORT_EXPERIMENTAL"


def check_recipe(fmt: str, request) -> None:
    """Refuse an unsupported (format, recipe) pair before any work starts."""
    import os

    supported = SUPPORTED_RECIPES[fmt]
    if request.recipe in supported:
        return
    if request.recipe in EXPERIMENTAL_RECIPES[fmt]:
        if os.environ.get(EXPERIMENTAL_ENV) == "1":
            return
        raise UnsupportedError(
            f"format {fmt} does not support recipe {request.recipe!r} yet (experimental: set "
            f"{EXPERIMENTAL_ENV}=1; supported: {', '.join(supported)})"
        )
    raise UnsupportedError(f"format {fmt} does not support recipe {request.recipe!r} (supported: {', '.join(supported)})")


def get(name: str):
    if name not in FORMATS:
        raise ConfigError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[name])
    except ImportError as e:
        raise BackendMissingError(f"format {name} needs a package that is not installed: {e.name}") from None
