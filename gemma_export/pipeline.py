"""The export pipeline, stage by stage:

    check   every target's backend lowers the recipe, the machine has the memory the job is
            estimated to peak at (resources.py), every destination may be written (and is
            claimed: a second export to it is refused), the disk has room for the artifacts
    load    the model (ModelSpec -> Gemma3 with window-sized caches)
    quantize once, in PyTorch (calibrated when the recipe says so), shared by every target
    convert per target: the backend writes its model files into a staging folder
    package the tokenizer and manifest.json beside them, linted; the folder is renamed into place

A failed or interrupted target leaves nothing at its destination; targets already written stay
(each is complete and verifiable). Manifests hold no timings: those go to the build record.
"""

from __future__ import annotations

import contextlib
import copy
import json
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from . import backends, resources
from .backends.base import Vocab
from .artifact import (TOKENIZER, Manifest, ModelInfo, TokenizerInfo, check_destination, check_free_space,
                       check_writable_file, claim, sha256_file, staging, write_manifest)
from .errors import ConfigError
from .sizes import artifact_bytes
from .gemma3 import family
from .gemma3.images import ImageSettings
from .lint import lint
from .loading import LoadedModel, ModelSpec, Tokenizer, load, read_config
from .loading.load import load_vision, read_vision_config
from .progress import heartbeat
from .quant import source
from .quant.quantize import QuantInfo, quantize_model
from .quant.recipes import QuantRecipe, resolve, with_kv_dtype

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    format: str
    out: Path


@dataclass(frozen=True)
class ExportJob:
    """One model, quantized once by one recipe, written to one or more targets."""

    model: ModelSpec
    targets: tuple[Target, ...]
    recipe: str = "fp32"  # a preset name or a recipe file
    prefill_len: int = 128
    max_context: int | None = None  # None: the model's default runtime context
    # a debug entry point returning per-layer hidden states (verify --locate); shares the weights,
    # but ExecuTorch lowers every method separately, so it costs export time and memory there
    debug_outputs: bool = True
    force: bool = False  # replace existing artifact folders; export even past the memory estimate
    # image entry points (vision encoder, embeddings into the decoder) for a model with a vision
    # encoder; False writes the text decoder only
    images: bool = True
    socs: tuple[str, ...] = ("SM8650",)  # the SoCs an NPU target compiles for
    kv_dtype: str | None = None  # the KV caches' dtype, replacing the recipe's (None: the recipe's)

    def __post_init__(self):
        if not self.targets:
            raise ConfigError("export needs at least one target format")
        formats = [t.format for t in self.targets]
        if len(set(formats)) < len(formats):
            raise ConfigError(f"a format is named twice: {', '.join(formats)}")
        if self.prefill_len < 2:
            raise ConfigError(f"prefill length must be at least 2, got {self.prefill_len}")

    @classmethod
    def single(cls, model: ModelSpec, fmt: str, out, **settings) -> "ExportJob":
        return cls(model, (Target(fmt, Path(out)),), **settings)

    @classmethod
    def each(cls, model: ModelSpec, formats, out, **settings) -> "ExportJob":
        """One target per format: `out` itself for one format, OUT/FORMAT for several."""
        formats = tuple(formats)
        outs = [Path(out)] if len(formats) == 1 else [Path(out) / f for f in formats]
        return cls(model, tuple(Target(f, o) for f, o in zip(formats, outs)), **settings)

    def settings(self) -> dict:
        """What the manifest records of the job (the targets are the artifacts themselves)."""
        return {"recipe": self.recipe, "prefill_len": self.prefill_len, "max_context": self.max_context,
                "debug_outputs": self.debug_outputs, "images": self.images,
                **({"socs": list(self.socs)} if any(t.format in backends.TARGETS for t in self.targets) else {}),
                **({"kv_dtype": self.kv_dtype} if self.kv_dtype else {})}

    def resolved_recipe(self) -> QuantRecipe:
        return with_kv_dtype(resolve(self.recipe), self.kv_dtype)


@dataclass
class Prepared:
    """What every target of a job shares: the loaded (and quantized) model."""

    loaded: LoadedModel
    quant: QuantInfo | None
    seconds: float  # loading and quantizing
    vision: object | None = None  # the vision encoder (Gemma3Vision, float) when images are exported
    recipe: QuantRecipe | None = None  # the job's recipe, resolved (the quantized one is quant.recipe)


def export(job: ExportJob, progress: Progress = lambda msg: None, record: Path | None = None) -> list[Manifest]:
    """Run the job; returns one manifest per target, in order. `record`: a JSON file to write the
    build record to (when it ran, stage timings, peak memory, the manifests' sha256)."""
    with heartbeat(progress) as progress:
        return _export(job, progress, record)


def _export(job: ExportJob, progress: Progress, record: Path | None) -> list[Manifest]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    job, targets, recipe = check(job)
    if record:
        check_writable_file(record)
    cfg = read_config(job.model.source)
    vision = read_vision_config(job.model.source, job.model.mmproj) if job.images else None
    images = [t.format for t, b in targets if getattr(b, "images", False)] if vision is not None else []
    disk = sum(artifact_bytes(cfg, recipe, t.format, t.format in images) for t, _ in targets)
    disk += int(len(images) * resources.vision_gib(vision) * resources.GIB) if images else 0  # the float tower
    needs = resources.estimate(cfg, recipe, [t.format for t, _ in targets], disk, vision)
    progress(f"{needs.describe()}; {resources.describe_available()}")
    resources.check_memory(needs, job.force)
    with contextlib.ExitStack() as held:
        for target, _ in targets:
            held.enter_context(claim(target.out))
            check_destination(target.out, job.force)  # again: another export may have finished meanwhile
        check_free_space([t.out for t, _ in targets], needs.disk)
        prepared = prepare(job, recipe, len(targets), progress)
        seconds, manifests = {"load_and_quantize": round(prepared.seconds, 1)}, []
        for i, (target, backend) in enumerate(targets):
            t0 = time.perf_counter()
            manifests.append(convert(job, target, backend, prepared, i == len(targets) - 1, progress))
            seconds[target.format] = round(time.perf_counter() - t0, 1)
    if record:
        Path(record).parent.mkdir(parents=True, exist_ok=True)
        Path(record).write_text(json.dumps({
            "started": started, "seconds": seconds,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "estimate": {"peak_memory_gib": round(needs.peak_memory / 2**30, 2), "stage": needs.stage,
                         "disk_gib": round(needs.disk / 2**30, 2)},
            "artifacts": [{"format": t.format, "out": str(t.out), "manifest_sha256": sha256_file(t.out / "manifest.json")}
                          for t, _ in targets]}, indent=2) + "\n")
    return manifests


def check(job: ExportJob):
    """Everything that can refuse the job, before any work: returns the job with its context
    resolved, the (target, backend) pairs and the recipe."""
    recipe = job.resolved_recipe()
    cfg = read_config(job.model.source)
    context = cfg.runtime_context(job.max_context or job.model.max_context)
    job = replace(job, max_context=context)
    if job.prefill_len > job.max_context:
        raise ConfigError(f"prefill length {job.prefill_len} exceeds max context {job.max_context}")
    if job.model.max_context not in (None, job.max_context):
        raise ConfigError(f"model spec asks for context {job.model.max_context}, the job for {job.max_context}")
    job = replace(job, model=replace(job.model, max_context=job.max_context))
    job = replace(job, targets=tuple(replace(t, format=backends.canonical(t.format)) for t in job.targets))
    targets = [(t, backends.get(t.format)) for t in job.targets]
    for target, backend in targets:
        backends.check_support(target.format, recipe)
        if hasattr(backend, "check"):  # what else a target needs of the job (an NPU target: its SoCs)
            backend.check(job)
    if recipe.uses_source:  # one rule per tensor with its type's scheme, judged by each format again
        if job.model.random_weights:
            raise ConfigError(f"recipe {recipe.name} keeps a checkpoint's codes; random weights have none")
        recipe = source.resolve_for(recipe, job.model.source, cfg)
        for target, _ in targets:
            backends.check_support(target.format, recipe)
    for target, _ in targets:
        check_destination(target.out, job.force)
    return job, targets, recipe


def prepare(job: ExportJob, recipe: QuantRecipe, targets: int, progress: Progress) -> Prepared:
    """Load the model and quantize it once for every target."""
    progress(f"loading {job.model.source}")
    t0 = time.perf_counter()
    loaded = load(job.model)
    quant = None
    if not recipe.is_float:
        progress(f"quantizing in PyTorch (recipe {recipe.name})" + (f", once for {targets} formats" if targets > 1 else ""))
        quant = quantize_model(loaded.model, recipe, Tokenizer(loaded.tokenizer_path), progress, loaded.checkpoint)
    loaded.model.set_kv_dtype(recipe.kv_dtype)
    vision = None
    if job.images and read_vision_config(job.model.source, job.model.mmproj) is not None:
        progress("loading the vision encoder (it stays float: the recipe quantizes the text decoder)")
        vision = load_vision(job.model)
    return Prepared(loaded, quant, time.perf_counter() - t0, vision, recipe)


def convert(job: ExportJob, target: Target, backend, prepared: Prepared, last: bool, progress: Progress) -> Manifest:
    """One target: the backend's files and the package around them, renamed into place when complete."""
    t0 = time.perf_counter()
    # the backend gets the only reference to its model, so it can free the eager weights as soon
    # as the format holds its own copy; earlier targets get a copy, the last the original
    model = prepared.loaded.take_model() if last else copy.deepcopy(prepared.loaded.model)
    with staging(target.out, job.force) as tmp:
        progress(f"converting to {target.format} (prefill {job.prefill_len}, context {job.max_context})")
        # stdout is the command's result (`--json`): whatever an exporter prints goes to stderr
        vision = prepared.vision
        if vision is not None and not getattr(backend, "images", False):
            progress(f"format {target.format} has no image entry points yet: writing the text decoder only")
            vision = None
        with contextlib.redirect_stdout(sys.stderr):
            exported = backend.export(model, job, tmp, progress, Vocab.of(Tokenizer(prepared.loaded.tokenizer_path)),
                                      vision=vision)
        del model
        progress("writing manifest (sha256 of every file)")
        manifest = package(tmp, job, target, prepared, exported)
        progress("linting the artifact (files, tokenizer, recipe, entry points read back from the model file)")
        lint(tmp).raise_if_failed()
    progress(f"wrote {target.out} in {time.perf_counter() - t0:.1f} s")
    return manifest


def package(folder: Path, job: ExportJob, target: Target, prepared: Prepared, exported) -> Manifest:
    """The tokenizer and manifest.json beside the backend's files."""
    loaded, quant = prepared.loaded, prepared.quant
    cfg = loaded.config
    shutil.copy(loaded.tokenizer_path, folder / TOKENIZER)
    return write_manifest(folder, Manifest(
        format=target.format,
        model=ModelInfo(cfg.name, loaded.source, job.model.to_dict(), cfg.to_dict()),
        job=job.settings(),
        prefill_len=job.prefill_len, max_context=job.max_context, window=cfg.sliding_window,
        cache_lengths=exported.cache_lengths or tuple(cfg.cache_len(i, job.max_context) for i in range(cfg.num_layers)),
        tokenizer=TokenizerInfo(TOKENIZER, cfg.bos_token_id, cfg.eos_token_id, family.STOP_TOKENS,
                                family.CHAT_TEMPLATE, sha256_file(loaded.tokenizer_path)),
        recipe=(quant.recipe if quant else prepared.recipe or job.resolved_recipe()).to_dict(),
        quantization=quant.to_dict() if quant else {},
        entry_points=exported.entry_points, program=exported.program, versions=exported.versions,
        images=_images(exported),
    ))


def _images(exported) -> dict | None:
    """The manifest's image block: the encoder's sizes and token ids, the preprocessing a runtime
    repeats, and the entry points by role."""
    if exported.images is None:
        return None
    vc, names = exported.images
    return {"vision": vc.to_dict(), "preprocessing": ImageSettings(size=vc.image_size).to_dict(), "entry_points": names}
