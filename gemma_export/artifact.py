"""Artifact folders: model files + tokenizer + manifest.json, written atomically and checked.

The manifest is read and written only through `Manifest` (a frozen dataclass with a schema
version). An export writes into a staging folder beside the destination and renames it into place
only when every file and the manifest are complete; on any failure the staging folder is removed,
so a failed export leaves nothing at the destination. This module imports nothing of gemma-export
but its errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .errors import ArtifactError, ConfigError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """Which model the artifact holds: its name, where it came from, and how to load it again."""

    name: str
    source: str  # human-readable origin: a path, "random weights (seed 0)", ...
    spec: dict  # loading.ModelSpec.to_dict(): what `verify` loads as the reference
    config: dict  # gemma3.Gemma3Config.to_dict()


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    bos: int
    eos: int
    stop: tuple[str, ...]
    chat_template: str


@dataclass(frozen=True)
class Manifest:
    """Everything an artifact folder says about itself. `program` and `entry_points` are the
    backend's own description (read only by that backend); the rest is common to every format."""

    format: str
    model: ModelInfo
    job: dict  # the export job's settings (recipe, prefill length, context, debug outputs)
    prefill_len: int
    max_context: int
    window: int
    cache_lengths: tuple[int, ...]
    tokenizer: TokenizerInfo
    recipe: dict  # quant.recipes.QuantRecipe.to_dict()
    quantization: dict  # calibration sha256, number of quantized modules, thresholds
    entry_points: dict
    program: dict  # at least "file"; "external_data" when weights live beside it
    versions: dict
    export_seconds: float
    files: dict[str, FileEntry] = field(default_factory=dict)
    created: str = ""
    manifest_version: int = MANIFEST_VERSION

    @property
    def recipe_name(self) -> str:
        return self.recipe.get("name", "fp32")

    @property
    def vocab_size(self) -> int:
        return int(self.model.config["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(self.model.config["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.model.config["hidden_size"])

    def named_files(self) -> list[str]:
        """The files the manifest names by role (program, external data, tokenizer)."""
        return [f for f in (self.program.get("file"), self.program.get("external_data"), self.tokenizer.file) if f]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"manifest_version": d.pop("manifest_version"), **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        version = d.get("manifest_version")
        if version != MANIFEST_VERSION:
            raise ArtifactError(f"{where}: manifest version {version!r}, this gemma-export reads version "
                                f"{MANIFEST_VERSION}; re-export the artifact")
        try:
            return cls(**{**d, "model": ModelInfo(**d["model"]),
                          "tokenizer": TokenizerInfo(**{**d["tokenizer"], "stop": tuple(d["tokenizer"]["stop"])}),
                          "cache_lengths": tuple(d["cache_lengths"]),
                          "files": {k: FileEntry(**v) for k, v in d["files"].items()}})
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{where}: manifest does not match its schema ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# Reading and checking
# ----------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path, missing: str, what: str) -> dict:
    """A JSON file the user pointed us at, with one-line typed errors."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt {what} ({e})") from None


def is_artifact(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    d = read_json(path, f"{folder}: no {MANIFEST}; not an artifact folder", "manifest")
    if not isinstance(d, dict):
        raise ArtifactError(f"{path}: corrupt manifest (not a JSON object)")
    return Manifest.from_dict(d, str(path))


def check_files(folder: str | Path, manifest: Manifest, hashes: bool = True) -> None:
    """The manifest and the folder agree: every file the manifest lists or names (program, external
    data, tokenizer) exists with its size (and sha256); with `hashes`, the folder holds no
    unlisted files either."""
    folder = Path(folder)
    listed = manifest.files
    for name in manifest.named_files():
        if name not in listed:
            raise ArtifactError(f"{folder}: the manifest names {name} but does not list it with a size and sha256")
    for name, info in listed.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != info.bytes:
            raise ArtifactError(f"{path}: {size} bytes, the manifest says {info.bytes} (truncated or replaced)")
        if hashes and sha256_file(path) != info.sha256:
            raise ArtifactError(f"{path}: sha256 does not match the manifest (corrupted or replaced)")
    if hashes:
        extra = sorted(name for name in _files(folder) if name not in listed)
        if extra:
            raise ArtifactError(f"{folder}: {', '.join(extra[:5])} not listed in the manifest "
                                "(added after export, or the manifest belongs to other files)")


def _files(folder: Path) -> list[str]:
    """The folder's files other than the manifest, relative, hidden ones left out."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def find_artifacts(build_dir: str | Path) -> list[Path]:
    """Artifact folders (holding manifest.json) under build_dir; staging and hidden folders skipped."""
    build_dir = Path(build_dir)
    found = sorted(p.parent for p in build_dir.rglob(MANIFEST)
                   if not any(part.startswith(".") for part in p.parent.relative_to(build_dir).parts))
    if not found:
        raise ArtifactError(f"{build_dir}: no artifact folders (subfolders with {MANIFEST})")
    return found


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def versions(*packages: str) -> dict[str, str]:
    """Versions of Python, gemma-export, torch and the given packages (recorded in manifests)."""
    out = {"python": platform.python_version()}
    for name in ("gemma-export", "torch", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_destination(out: Path, force: bool) -> None:
    """An artifact may be written to `out`: it is new, or (with force) an artifact folder or empty."""
    out = Path(out)
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


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Record the size and sha256 of every file in `folder` and write manifest.json there."""
    folder = Path(folder)
    files = {}
    for name in _files(folder):
        path = folder / name
        files[name] = FileEntry(path.stat().st_size, sha256_file(path))
    manifest = dataclasses.replace(manifest, files=files, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   manifest_version=MANIFEST_VERSION)
    (folder / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
    return manifest
