"""Artifact folders: model files + tokenizer + manifest.json, written atomically.

An export writes into a temporary folder beside the destination and renames it into place only
when every file and the manifest are complete; on any failure the temporary folder is removed,
so a failed export leaves nothing at the destination.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from .errors import ArtifactError, ConfigError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class ExportRequest:
    """What to produce: the format and the static shapes of the entry points."""

    format: str
    prefill_len: int = 128
    max_context: int = 4096
    recipe: str = "fp32"
    # a third entry point returning per-layer hidden states (verify --locate); shares the weights,
    # but ExecuTorch lowers every method separately, so it costs export time and memory there
    debug_outputs: bool = True

    def __post_init__(self):
        if self.prefill_len < 2:
            raise ConfigError(f"prefill length must be at least 2, got {self.prefill_len}")
        if self.prefill_len > self.max_context:
            raise ConfigError(f"prefill length {self.prefill_len} exceeds max context {self.max_context}")

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("gemma-export", "torch", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_destination(out: Path, force: bool) -> None:
    """An artifact may be written to `out`: it is new, or (with force) an artifact folder or empty."""
    if out.exists():
        if not force:
            raise ConfigError(f"{out} already exists; choose another --out or pass --force")
        if not out.is_dir() or (not (out / MANIFEST).is_file() and any(out.iterdir())):
            raise ConfigError(f"{out} exists and is not an artifact folder; refusing to replace it")


@contextmanager
def staging(out: Path, force: bool = False):
    """Yield a temporary folder that becomes `out` only if the block completes."""
    out = Path(out)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict) -> dict:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"manifest_version": MANIFEST_VERSION, **manifest, "files": files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_json(path: Path, missing: str, what: str) -> dict:
    """A JSON file the user pointed us at, with one-line typed errors."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt {what} ({e})") from None


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    m = read_json(path, f"{folder}: no {MANIFEST}; not an artifact folder", "manifest")
    for key in ("format", "model", "files", "entry_points"):
        if key not in m:
            raise ArtifactError(f"{path}: manifest has no {key!r} field")
    return m


def check_files(folder: str | Path, manifest: dict, hashes: bool = True) -> None:
    """The manifest and the folder agree: every file the manifest lists or names (program, external
    data, tokenizer) exists with its size (and sha256); with `hashes`, the folder holds no
    unlisted files either."""
    folder = Path(folder)
    listed = manifest["files"]
    named = [manifest.get("program", {}).get(k) for k in ("file", "external_data")]
    named.append(manifest.get("tokenizer", {}).get("file"))
    for name in filter(None, named):
        if name not in listed:
            raise ArtifactError(f"{folder}: the manifest names {name} but does not list it with a size and sha256")
    for name, info in listed.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(f"{path}: {size} bytes, the manifest says {info['bytes']} (truncated or replaced)")
        if hashes and sha256_file(path) != info["sha256"]:
            raise ArtifactError(f"{path}: sha256 does not match the manifest (corrupted or replaced)")
    if hashes:
        extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.is_file() and p.name != MANIFEST and str(p.relative_to(folder)) not in listed
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if extra:
            raise ArtifactError(f"{folder}: {', '.join(extra[:5])} not listed in the manifest "
                                "(added after export, or the manifest belongs to other files)")


Progress = Callable[[str], None]


def export(spec, request: ExportRequest, out: Path, force: bool = False,
           progress: Progress = lambda msg: None) -> dict:
    """Load the model, convert it with the format's converter, package it atomically."""
    return export_formats(spec, [request], [Path(out)], force, progress)[0]


def export_formats(spec, requests: list[ExportRequest], outs: list[Path], force: bool = False,
                   progress: Progress = lambda msg: None) -> list[dict]:
    """Export one model to several formats: load and quantize (calibrate) once, then convert a copy
    per format, each packaged atomically. Every request must share the recipe and context.

    Everything that can refuse the job (format/recipe support, existing destinations) is checked
    before any work starts; if a later format fails, the artifacts already written stay (each is
    complete and verifiable) and nothing of the failed one is left.
    """
    import converters

    from .loading import load

    if len(requests) != len(outs) or not requests:
        raise ConfigError("export needs one output folder per format")
    shared = {(r.recipe, r.max_context) for r in requests}
    if len(shared) > 1:
        raise ConfigError("a multi-format export shares one recipe and one max context")
    if len({r.format for r in requests}) < len(requests):
        raise ConfigError(f"a format is named twice: {', '.join(r.format for r in requests)}")
    fmts = [converters.get(r.format) for r in requests]
    for fmt, request in zip(fmts, requests):
        fmt.check(request)
    for out in outs:
        check_destination(Path(out), force)
    progress(f"loading {spec.source}")
    t0 = time.perf_counter()
    loaded = load(spec)
    cfg, cache_lengths = loaded.config, loaded.model.cache_lengths()
    request = requests[0]
    if loaded.model.max_context != request.max_context:
        raise ConfigError(f"model built for context {loaded.model.max_context}, request says {request.max_context}")
    quant = {}
    if request.recipe != "fp32":
        from .api import quantize_model
        from .tokenizer import Tokenizer

        progress(f"quantizing in PyTorch (recipe {request.recipe})"
                 + (f", once for {len(requests)} formats" if len(requests) > 1 else ""))
        quant = quantize_model(loaded.model, request.recipe, Tokenizer(loaded.tokenizer_path), progress)
    prepared_s = time.perf_counter() - t0
    manifests = []
    for i, (fmt, request, out) in enumerate(zip(fmts, requests, outs)):
        t1 = time.perf_counter()
        # the converter gets the only reference to its model, so it can free the eager weights as
        # soon as the format holds its own copy; earlier formats get a copy, the last the original
        model = loaded.take_model() if i == len(requests) - 1 else copy.deepcopy(loaded.model)
        with staging(Path(out), force) as tmp:
            progress(f"converting to {request.format} (prefill {request.prefill_len}, context {request.max_context})")
            parts = fmt.export(model, request, tmp, progress)
            del model
            shutil.copy(loaded.tokenizer_path, tmp / TOKENIZER)
            progress("writing manifest (sha256 of every file)")
            manifest = write_manifest(tmp, {
                "format": request.format,
                "model": {"name": cfg.name, "source": loaded.source, "spec": spec.to_dict(), "config": cfg.to_dict()},
                "request": request.to_dict(),
                "prefill_len": request.prefill_len,
                "max_context": request.max_context,
                "window": cfg.sliding_window,
                "cache_lengths": cache_lengths,
                "tokenizer": {"file": TOKENIZER, "bos": cfg.bos_token_id, "eos": cfg.eos_token_id,
                              "stop": ["<end_of_turn>", "<eos>"],
                              "chat_template": "<bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"},
                # loading and quantizing (shared by a multi-format export) plus this conversion
                "export_seconds": round(prepared_s + time.perf_counter() - t1, 1),
                "recipe": quant.get("recipe") or {"name": "fp32"},
                "quantization": {k: v for k, v in quant.items() if k != "recipe"},
                **parts,
            })
        progress(f"wrote {out}")
        manifests.append(manifest)
    return manifests


def open_artifact(folder: str | Path, threads: int = 2, hashes: bool = False):
    """A Session (and tokenizer) for an exported artifact folder."""
    import converters

    from .api import Opened
    from .tokenizer import Tokenizer

    manifest = read_manifest(folder)
    check_files(folder, manifest, hashes=hashes)
    tok = Tokenizer(Path(folder) / manifest["tokenizer"]["file"])
    vocab = manifest["model"]["config"]["vocab_size"]
    if tok.vocab_size != vocab:
        raise ArtifactError(f"{folder}: tokenizer {manifest['tokenizer']['file']} has {tok.vocab_size} tokens, "
                            f"the model's vocabulary {vocab}; it is not this model's tokenizer")
    fmt = converters.get(manifest["format"])
    session = fmt.open(Path(folder), manifest, threads)
    return Opened(session, tok, f"{manifest['format']} artifact {folder}")
