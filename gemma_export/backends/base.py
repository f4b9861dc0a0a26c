"""The one protocol every backend implements, and the pieces backends share.

A backend is one module exposing `BACKEND`, an object with:
  name        the name used on the command line and in manifests
  lowering    what it lowers (`Lowering`): checked against a recipe before any work starts
  runner      how a device runs the artifact (`Runner`): the golden bundle's script names it
  images      True when export takes a vision encoder and writes image entry points
  export(model, job, workdir, progress, vocab, vision=None) -> Exported   write the model files
                into workdir (with `vision`, a Gemma3Vision, also the image entry points)
  open(folder, manifest, threads) -> Session            run the artifact in the format's runtime
  read_codes(folder, manifest) -> [codes]               the integer weight codes the files hold
  declared_io(folder, manifest) -> {entry: {"inputs": [...], "outputs": [...]}}
                the entry points, tensor names, shapes and dtypes as the model file itself declares
                them (what `lint` holds the manifest to)
  stock_generate(folder, manifest, text, max_new_tokens) -> Stock
                greedy generation by the runtime's own LLM API on the artifact as shipped (the
                prompt text has no <bos>: each runtime adds it its own way)
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..artifact import Manifest
from ..errors import BackendMissingError, ExportError
from ..gemma3 import family
from ..session import BaseSession, SessionInfo
from ..quant.recipes import Rule

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Lowering:
    """What a backend lowers: weight kinds as (bits, granularity), activation modes, and whether
    every linear and the table must be quantized (`complete`: the format's quantizer takes all of
    them or none). A recipe is judged by its content against this table, so a recipe file is
    checked as strictly as a preset."""

    weights: frozenset
    activations: frozenset
    complete: bool = False
    blocks: frozenset = frozenset({32, 64, 128})  # input columns per block scale
    asymmetric: frozenset = frozenset()  # code widths stored with float zero points (source codes)
    float_compute: frozenset = frozenset({"fp32"})  # the arithmetic an unquantized recipe can run in
    kv_dtypes: frozenset = frozenset({"fp32"})  # what its attention kernels read the KV caches in

    def refusal(self, recipe) -> str | None:
        """Why this backend cannot lower `recipe` (a QuantRecipe), or None when it can."""
        if recipe.kv_dtype not in self.kv_dtypes:
            return (f"{recipe.kv_dtype} KV caches (this format's attention reads "
                    f"{', '.join(sorted(self.kv_dtypes))} caches)")
        if recipe.is_float:
            if recipe.compute_dtype not in self.float_compute:
                return (f"{recipe.compute_dtype} arithmetic (this format computes floats in "
                        f"{', '.join(sorted(self.float_compute))})")
            return None
        rules = recipe.rules
        if recipe.mix is not None:  # a budgeted recipe may give any tensor its upgrade scheme
            rules = (*rules, Rule("(budget upgrade)", recipe.mix.upgrade))
        if self.complete:
            floats = [n for n in (family.TABLE, *family.layer_linears(0)) if recipe.scheme_for(n) is None]
            if floats:
                return f"a float {floats[0]} among quantized weights (this format quantizes all layers and the embedding or none)"
        for rule in rules:
            sc = rule.scheme
            if sc is None:
                continue
            if (sc.bits, sc.granularity) not in self.weights:
                kind = "per-channel" if sc.granularity == "channel" else "block-wise"
                return f"{kind} int{sc.bits} weights (rule {rule.pattern!r})"
            if sc.activations not in self.activations:
                return f"{sc.activations} activations (rule {rule.pattern!r})"
            if sc.granularity == "block" and sc.block_size not in self.blocks:
                return f"int{sc.bits} blocks of {sc.block_size} (rule {rule.pattern!r})"
            if not sc.symmetric and (sc.bits not in self.asymmetric or rule.pattern == family.TABLE):
                return f"int{sc.bits} codes with zero points (rule {rule.pattern!r})"
        return None


@dataclass(frozen=True)
class Runner:
    """How a phone runs an artifact of this backend: the environment variable the golden bundle's
    script reads for the on-device runner binary, and what that runner must do."""

    env: str
    description: str
    # the stock runtime tool's arguments for one greedy generation on the phone, run from the
    # folder holding artifact/: {prompt} is the prompt text as the tool takes it, {seq_len} the
    # prompt plus new tokens, {new_tokens} the new tokens
    stock_args: tuple[str, ...] = ()
    bos_in_prompt: bool = True  # the tool adds no <bos> itself: the prompt text starts with it


@dataclass(frozen=True)
class Vocab:
    """What a runtime's own metadata needs of the tokenizer: the file to ship beside the model,
    BOS, the stop tokens (ids) and padding (the chat template is the family's)."""

    path: Path
    bos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> "Vocab":
        return cls(tokenizer.path, tokenizer.bos_id, tokenizer.pad_id, tuple(tokenizer.stop_ids))


@dataclass(frozen=True)
class Stock:
    """What a runtime's stock LLM API generated: the text as it streams it, and the token ids where
    the API gives them (the stop token, if one came, left out of both)."""

    text: str
    tokens: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Exported:
    """What a backend's export adds to the manifest."""

    entry_points: dict
    program: dict  # at least "file"; "external_data" when weights live beside it
    versions: dict = field(default_factory=dict)
    cache_lengths: tuple[int, ...] | None = None  # when the runtime's caches differ from the model's
    images: tuple | None = None  # (VisionConfig, {role: entry point}) when image entry points were written


class Backend(Protocol):
    name: str
    lowering: Lowering
    runner: Runner

    def export(self, model, job, workdir: Path, progress: Progress, vocab: Vocab, vision=None) -> Exported: ...

    def open(self, folder: Path, manifest: Manifest, threads: int) -> BaseSession: ...

    def read_codes(self, folder: Path, manifest: Manifest) -> list[np.ndarray]:
        """Every integer code array stored in the artifact (int8; [out, in], or [in, out] where
        the format stores a weight transposed): the bit-exact test looks for PyTorch's codes here."""
        ...

    def stock_generate(self, folder: Path, manifest: Manifest, text: str, max_new_tokens: int) -> "Stock": ...

    def declared_io(self, folder: Path, manifest: Manifest) -> dict[str, dict]:
        """Each entry point's inputs and outputs read from the model file: [{"name", "shape",
        "dtype"}], a dynamic dimension as a string, a name None where the format has none."""
        ...


def require(module: str, backend: str):
    """Import a backend's runtime or exporter package, or say clearly that it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendMissingError(f"format {backend} needs a package that is not installed: "
                                  f"{e.name or module}") from None


def session_info(manifest: Manifest) -> SessionInfo:
    return SessionInfo(manifest.prefill_len, manifest.max_context, manifest.vocab_size, manifest.window)


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float32)).hexdigest()  # no bytes copy


def match_weights(codes: dict, stored: Iterable[tuple[str, np.ndarray]], transposed: bool = False) -> dict:
    """Find each quantized weight among a converted file's float tensors by its exact values
    (codes x scales), whatever the converter renamed it to.

    `codes` maps weight names to (codes, scales, scheme, zero points); `stored` yields (tensor name, fp32 array).
    Returns {tensor name: (weight name, layout)} with layout "oi" (as [out, in]) or, with
    `transposed`, also "io" ([in, out]). Raises if a weight is not found.
    """
    from ..quant.algorithms import dequantize

    wanted = {}
    for name, (q, s, _, z) in codes.items():
        w = dequantize(q, s, z).numpy()
        wanted[_digest(w)] = (name, "oi")
        if transposed:
            wanted[_digest(w.T)] = (name, "io")
    found = {}
    for tensor, arr in stored:
        hit = wanted.get(_digest(arr))
        if hit is not None:
            found[tensor] = hit
    missing = sorted(set(codes) - {name for name, _ in found.values()})
    if missing:
        raise ExportError(f"could not find the converted weight of {missing[0]} to lower its codes")
    return found
