"""The Python API: what the command line calls, and what scripts use.

    import gemma_export as ge

    ge.export("gemma3-270m", "onnx", "build/onnx", recipe="int8")   # -> [Manifest]
    model = ge.open("build/onnx")                                    # the artifact in onnxruntime
    print(model.generate("The capital of France is", max_new_tokens=16).text)
    ge.verify("build/onnx").raise_if_failed()                        # ParityError unless it matches PyTorch

A model reference is a preset name, a Hugging Face folder, a .gguf file or an artifact folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import calibration

from . import backends, pipeline
from .artifact import Manifest, is_artifact, read_manifest
from .errors import ConfigError
from .gemma3.config import PRESETS, Gemma3Config
from .lint import LintReport
from .lint import lint as lint_artifact
from .sizes import report
from .loading import LoadedModel, ModelSpec, Tokenizer, read_config as read_model_config
from .loading import load as load_model
from .loading.load import read_vision_config
from .quant import source
from .quant.quantize import QuantInfo, quantize_model
from .quant.recipes import QuantRecipe, Rule, Scheme, resolve
from .runtime import Opened, open_ref
from .verification import bundle as bundles
from .verification import check

DEFAULT_TEXT = calibration.EVAL_TEXT  # held out from calibration: the default text of verify and eval


def _spec(model: str | ModelSpec, **spec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec(str(model), **spec)


def read_config(ref: str) -> Gemma3Config:
    """The model config behind any reference (artifacts included), without loading weights."""
    if ref in PRESETS:
        return PRESETS[ref]
    if is_artifact(ref):
        return Gemma3Config.from_dict(read_manifest(ref).model.config)
    return read_model_config(ref)


def load(model: str | ModelSpec, **spec) -> LoadedModel:
    """The PyTorch model and its tokenizer (`spec`: ModelSpec fields, e.g. random_weights=True)."""
    return load_model(_spec(model, **spec))


def quantize(loaded: LoadedModel, recipe, progress=lambda m: None) -> QuantInfo:
    """Quantize a loaded model in place with a recipe (preset name, recipe file or QuantRecipe),
    calibrating on the bundled corpus when the recipe asks for it."""
    return quantize_model(loaded.model, recipe, Tokenizer(loaded.tokenizer_path), progress, loaded.checkpoint)


def export(model: str | ModelSpec | pipeline.ExportJob, formats=None, out=None, progress=lambda m: None,
           record=None, **settings) -> list[Manifest]:
    """Export a model to one or more formats (`formats`: a name or a list; several go to OUT/FORMAT),
    loaded and quantized once. `settings` are ExportJob fields (recipe, prefill_len, max_context,
    debug_outputs, force); or pass a whole ExportJob. `record`: a JSON file for the build record
    (timings, peak memory), which the artifact itself does not hold."""
    if isinstance(model, pipeline.ExportJob):
        return pipeline.export(model, progress, record)
    formats = [formats] if isinstance(formats, str) else list(formats or ())
    return pipeline.export(pipeline.ExportJob.each(_spec(model), formats, out, **settings), progress, record)


def lint(artifact: str | Path) -> LintReport:
    """Is an artifact folder complete and labelled truthfully? (a report with one line per problem)"""
    return lint_artifact(artifact)


def open(ref: str, recipe="fp32", prefill_len: int = 128, threads: int = 2, spec: ModelSpec | None = None,  # noqa: A001
         progress=lambda m: None) -> Opened:
    """A Session and tokenizer for an artifact folder (in its format's runtime) or a PyTorch model
    (quantized in PyTorch when `recipe` is not fp32; `spec` overrides how it is loaded)."""
    return open_ref(ref, spec, recipe, prefill_len, threads, progress)


def verify(artifact: str | Path, build: bool = False, plan: check.VerifyPlan | None = None, progress=lambda m: None):
    """Parity of an artifact (or, with `build`, of every artifact in a build folder) against the
    PyTorch model it came from; the result carries the judge's verdict."""
    plan = plan or check.VerifyPlan(DEFAULT_TEXT)
    if build:
        return check.verify_build(artifact, plan, progress)
    return check.verify_artifact(artifact, plan, progress=progress)


def check_outputs(outputs: str | Path, bundle: str | Path | None = None, artifact: str | Path | None = None,
                  overrides: dict | None = None) -> bundles.Checked:
    """Judge outputs a runner produced (on a phone, a simulator or the desktop) against a golden bundle."""
    return bundles.check_outputs(outputs, bundle, artifact, overrides)


def bundle(artifact: str | Path, out: str | Path, plan: bundles.BundlePlan | None = None,
           progress=lambda m: None) -> dict:
    """Write a golden bundle for an artifact: inputs, reference outputs and a device runner script."""
    return bundles.make_bundle(artifact, out, plan or bundles.BundlePlan(DEFAULT_TEXT), progress)


def run_bundle(bundle_dir: str | Path, artifact: str | Path, out: str | Path, threads: int = 2,
               stock_runtime: bool = False) -> dict:
    """Produce a bundle's outputs with the artifact's desktop runtime, in the device layout (or,
    with `stock_runtime`, the text the runtime's own LLM API generates from the bundle's prompt)."""
    return bundles.run_bundle(bundle_dir, artifact, out, threads, stock_runtime)


def evaluate(model: str, spec: ModelSpec | None = None, recipe="fp32", prefill_len: int = 128,
             plan: check.EvalPlan | None = None, progress=lambda m: None) -> dict:
    """Perplexity on held-out text, and KL / top-1 agreement against the fp32 model."""
    return check.evaluate(spec or ModelSpec(model), recipe, prefill_len, plan or check.EvalPlan(DEFAULT_TEXT), progress)


def inspect(ref: str, context: int | None = None, kv_dtype: str = "float32", recipe=None,
            mmproj: str | None = None) -> dict:
    """Parameter counts, weight bytes per dtype and KV-cache bytes of a model (no weights loaded);
    with `recipe`, also each tensor's source quantization type and what the recipe does with it;
    with `mmproj`, the vision encoder in llama.cpp's file beside a GGUF."""
    cfg = read_config(ref)
    ctx = context or cfg.max_position_embeddings
    if ctx < 1:
        raise ConfigError(f"--context must be positive, got {ctx}")
    r = report(cfg, ctx, kv_dtype)
    vc = read_vision_config(ref, mmproj) if not is_artifact(ref) else None
    if vc is not None:
        r["vision"] = {"config": vc.to_dict(), "parameters": vc.param_count()}
    if recipe is not None:
        r["quantization"] = _inspect_checkpoint(ref, resolve(recipe), cfg)
    return r


def _exactness(backend, scheme: Scheme | None) -> str:
    """What a format does with one tensor of a concrete source recipe."""
    if scheme is None:
        return "float"
    probe = QuantRecipe("probe", (Rule("*", scheme),))
    lowering = backend.lowering
    why = replace(lowering, complete=False).refusal(probe)
    if why:
        return f"refused: cannot lower {why.replace(' (rule ' + repr('*') + ')', '')}"
    if scheme.algorithm != "source":
        return f"rounded to nearest ({scheme.label})"
    if source.as_stored_changes(scheme):
        return "codes kept with the sign of negative scales folded in (a -8 becomes 7), scales rounded to bf16"
    return "exact"


def _inspect_checkpoint(model_source: str, recipe: QuantRecipe, cfg) -> dict:
    """Each quantizable tensor's source type and what `recipe` (and each format) does with it."""
    types = source.tensor_types(source.checkpoint_of(model_source))
    concrete_recipe = source.concrete(recipe, types, source.modules(cfg)) if types else recipe
    rows, formats = [], {}
    for module in source.modules(cfg):
        scheme = concrete_recipe.scheme_for(module)
        row = {"tensor": module, "source": types.get(module, "float"),
               "recipe": scheme.label if scheme else "float",
               "formats": {f: _exactness(backends.get(f), scheme) for f in ("onnx", "pte", "tflite")}}
        rows.append(row)
    for f in ("onnx", "pte", "tflite"):
        why = backends.get(f).lowering.refusal(concrete_recipe)
        formats[f] = f"refused: cannot lower {why}" if why else "lowers the recipe"
    return {"recipe": recipe.name, "tensors": rows, "summary": source.summary(concrete_recipe, types), "formats": formats}
