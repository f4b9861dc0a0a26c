"""Opening something to run: an exported artifact in its format's runtime, or a PyTorch model
(optionally quantized by a recipe), each as a `Session` with its tokenizer.

`reference_for` gives the PyTorch reference of an artifact: the model it came from, with the
artifact's recipe (the same codes) or in fp32.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import backends
from .artifact import Manifest, check_files, is_artifact, read_manifest
from .errors import ArtifactError, UnsupportedError
from .gemma3.images import ImageSettings
from .loading import ModelSpec, Tokenizer, load
from .loading.load import load_vision
from .quant.recipes import resolve
from .session import Sampling, Session, TorchSession, continue_from, generate


@dataclass(frozen=True)
class Generation:
    prompt_tokens: int
    tokens: list[int]  # the new tokens; a stop token, if one came, is the last
    text: str  # without the stop token
    time_to_first_token_s: float
    total_s: float


@dataclass
class Opened:
    session: Session
    tokenizer: Tokenizer
    description: str
    manifest: Manifest | None = None  # for artifacts
    vision: Callable[[], object] | None = None  # loads the PyTorch model's vision encoder (None: it has none)

    def stream(self, prompt: str, max_new_tokens: int = 64, chat: bool = False,
               sampling: Sampling = Sampling()) -> Iterator[int]:
        """New token ids for a text prompt (the Gemma chat format with `chat`); a stop token, if
        one comes, is the last."""
        return generate(self.session, self._prompt_ids(prompt, chat), max_new_tokens, self.tokenizer.stop_ids, sampling)

    def _prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        return self.tokenizer.chat(prompt) if chat else self.tokenizer.encode(prompt)

    def _image_stream(self, prompt: str, images_in, chat: bool, max_new_tokens: int, sampling: Sampling,
                      pan_and_scan: bool):
        from .gemma3.vision import VisionConfig  # torch
        from .multimodal import image_prompt, prefill, session_prefill

        if self.manifest is not None:
            images = self.manifest.images
            if images is None:
                raise UnsupportedError(f"{self.description} has no image entry points (a text-only model, an export "
                                       "with --no-images, or a format that has none yet)")
            vc = VisionConfig.from_dict(images["vision"])
            settings = ImageSettings.from_dict(images["preprocessing"]).replace(pan_and_scan=pan_and_scan)
            p = image_prompt(self.tokenizer, vc, settings, prompt, images_in, chat)
            logits = session_prefill(self.session, vc, p)
            return list(p.ids), continue_from(self.session, logits, len(p.ids), max_new_tokens,
                                              self.tokenizer.stop_ids, sampling)
        vision = self.vision() if self.vision is not None else None
        if vision is None:
            raise UnsupportedError(f"{self.session.model.cfg.name} is a text-only model (Gemma 3 4B and larger "
                                   "see images; a GGUF text model takes llama.cpp's vision file with --mmproj)")
        p = image_prompt(self.tokenizer, vision.cfg, ImageSettings(size=vision.cfg.image_size, pan_and_scan=pan_and_scan),
                         prompt, images_in, chat)
        session = self.session
        session.reset()
        logits, session.cache = prefill(session.model, vision, p)
        return list(p.ids), continue_from(session, logits, len(p.ids), max_new_tokens, self.tokenizer.stop_ids,
                                          sampling)

    def generate(self, prompt: str, max_new_tokens: int = 64, chat: bool = False, sampling: Sampling = Sampling(),
                 on_text: Callable[[str], None] | None = None, images=(), pan_and_scan: bool = False) -> Generation:
        """Generate from a text prompt (with `images`: paths, see multimodal.image_prompt); `on_text`
        receives the new text as it is decoded."""
        tok, stop = self.tokenizer, self.tokenizer.stop_ids
        start = time.perf_counter()
        if images:
            ids, stream = self._image_stream(prompt, images, chat, max_new_tokens, sampling, pan_and_scan)
        else:
            ids = self._prompt_ids(prompt, chat)
            stream = generate(self.session, ids, max_new_tokens, stop, sampling)
        first, tokens, shown = None, [], ""
        for token in stream:
            first = first or time.perf_counter()
            tokens.append(token)
            if on_text is not None and token not in stop:
                text = tok.decode(tokens)
                on_text(text[len(shown):])
                shown = text
        end = time.perf_counter()
        return Generation(len(ids), tokens, tok.decode([t for t in tokens if t not in stop]),
                          (first or end) - start, end - start)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def open_artifact(folder: str | Path, threads: int = 2, hashes: bool = False) -> Opened:
    """A Session (and tokenizer) for an exported artifact folder, in its format's runtime."""
    _threads(threads)
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_files(folder, manifest, hashes=hashes)
    tok = Tokenizer(folder / manifest.tokenizer.file)
    # a vocabulary may hold up to 64 rows past the tokenizer (the 4B's 262,208: image tokens and padding)
    if not 0 <= manifest.vocab_size - tok.vocab_size <= 64:
        raise ArtifactError(f"{folder}: tokenizer {manifest.tokenizer.file} has {tok.vocab_size} tokens, "
                            f"the model's vocabulary {manifest.vocab_size}; it is not this model's tokenizer")
    session = backends.get(manifest.format).open(folder, manifest, threads)
    return Opened(session, tok, f"{manifest.format} artifact {folder}", manifest)


def open_model(spec: ModelSpec, recipe="fp32", prefill_len: int = 128, threads: int = 2,
               progress=lambda m: None) -> Opened:
    """The eager PyTorch model as a Session, quantized in PyTorch when `recipe` is not fp32."""
    from .quant.quantize import quantize_model  # torch

    _threads(threads)
    loaded = load(spec)
    tok = Tokenizer(loaded.tokenizer_path)
    description = loaded.source
    recipe = resolve(recipe)
    if not recipe.is_float:
        quantize_model(loaded.model, recipe, tok, progress, loaded.checkpoint)
        description += f" quantized in PyTorch (recipe {recipe.name})"
    if recipe.kv_dtype != "fp32":
        loaded.model.set_kv_dtype(recipe.kv_dtype)
        if recipe.is_float:
            description += f" with {recipe.kv_dtype} KV caches in PyTorch"

    @functools.cache  # loaded on the first image prompt, once
    def vision():
        return load_vision(spec)

    return Opened(TorchSession(loaded.model, prefill_len=prefill_len), tok, description, vision=vision)


def open_ref(ref: str, spec: ModelSpec | None = None, recipe="fp32", prefill_len: int = 128, threads: int = 2,
             progress=lambda m: None) -> Opened:
    """An artifact folder, or else the model `spec` (default: `ref` itself with fp32 weights)."""
    if is_artifact(ref):
        return open_artifact(ref, threads)
    return open_model(spec or ModelSpec(ref), recipe, prefill_len, threads, progress)


def reference_for(manifest: Manifest, quantized: bool = True, override: str | None = None,
                  threads: int = 2) -> Opened:
    """The PyTorch reference of an artifact: the model it came from (or `override`), with the
    artifact's recipe applied in PyTorch (`quantized`, the same codes) or in fp32."""
    spec = dict(manifest.model.spec or {})
    if override:
        spec = {"source": override}
    if not spec.get("source"):
        raise ArtifactError("the manifest does not say which model it came from; pass --reference")
    spec = ModelSpec(**{**spec, "max_context": manifest.max_context})
    recipe = manifest.recipe if quantized and manifest.recipe_name != "fp32" else "fp32"
    return open_model(spec, recipe, manifest.prefill_len, threads)
