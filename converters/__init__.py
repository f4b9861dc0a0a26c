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


# What each format lowers, as scheme properties, so recipe files are judged by their content:
# weight (bits, granularity) pairs and activation modes. Checked before any work starts.
LOWERS = {
    # DequantizeLinear of the codes (per channel or blocked, INT8/INT4); activation quantization as
    # float ops that compute exactly the PyTorch reference
    "onnx": ({(8, "channel"), (8, "block"), (4, "channel"), (4, "block")},
             {"float", "int8-dynamic", "int8-static", "int16-static"}),
    # XNNPACK delegates integer weights only with its own dynamic int8 activations: qc8w / qb4w
    "pte": ({(8, "channel"), (4, "block")}, {"int8-dynamic"}),
    # dynamic-range kernels (XNNPACK): int8 per channel or int4 blocks, activations quantized by
    # the kernel; one weight scheme for the whole model (see UNIFORM)
    "tflite": ({(8, "channel"), (4, "block")}, {"int8-dynamic"}),
}
# formats whose quantized lowering applies one weight scheme to every linear and the embedding
UNIFORM = {"tflite"}


def unsupported_reason(fmt: str, recipe) -> str | None:
    """Why `fmt` cannot lower `recipe` (a QuantRecipe), or None when it can."""
    if recipe.is_float:
        return None
    weights, activations = LOWERS[fmt]
    if fmt in UNIFORM:
        kinds = {(r.scheme.bits, r.scheme.granularity, r.scheme.block_size) if r.scheme else None
                 for r in recipe.rules}
        names = ["embed_tokens"] + [f"layers.0.{m}" for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        if len(kinds) > 1 or any(recipe.scheme_for(n) is None for n in names):
            return "a mix of weight schemes (this format takes one scheme for all layers and the embedding)"
    for rule in recipe.rules:
        sc = rule.scheme
        if sc is None:
            continue
        if (sc.bits, sc.granularity) not in weights:
            kind = "per-channel" if sc.granularity == "channel" else "block-wise"
            return f"{kind} int{sc.bits} weights (rule {rule.pattern!r})"
        if sc.activations not in activations:
            return f"{sc.activations} activations (rule {rule.pattern!r})"
    return None


def check_recipe(fmt: str, request) -> None:
    """Refuse an unsupported (format, recipe) pair before any work starts."""
    from gemma_export.recipes import resolve

    recipe = resolve(request.recipe)
    reason = unsupported_reason(fmt, recipe)
    if reason:
        raise UnsupportedError(f"format {fmt} does not support recipe {recipe.name!r}: cannot lower {reason}")


def supported_presets(fmt: str) -> list[str]:
    from gemma_export.recipes import PRESETS

    return [n for n, r in PRESETS.items() if unsupported_reason(fmt, r) is None]


def get(name: str):
    if name not in FORMATS:
        raise ConfigError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[name])
    except ImportError as e:
        raise BackendMissingError(f"format {name} needs a package that is not installed: {e.name}") from None
