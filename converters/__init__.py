"""Export formats. One module per format, looked up by name in this explicit table.

Each module offers the same small protocol:
  FORMAT: str                                  name used on the command line and in manifests
  check(recipe) -> None                        raises UnsupportedError before any work starts
  export(model, request, workdir) -> dict      writes model files into workdir, returns manifest parts
  open(artifact_dir, manifest, threads) -> Session
"""

from __future__ import annotations

import importlib

from gemma_export.errors import BackendMissingError, ConfigError

FORMATS = {
    "pte": "converters.executorch",
    "onnx": "converters.onnx",
    "tflite": "converters.tflite",
}


def get(name: str):
    if name not in FORMATS:
        raise ConfigError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[name])
    except ImportError as e:
        raise BackendMissingError(f"format {name} needs a package that is not installed: {e.name}") from None
