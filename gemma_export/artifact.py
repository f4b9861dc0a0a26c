"""Artifact folders: model files + tokenizer + manifest.json, written atomically and checked.

The manifest is read and written only through `Manifest` (a frozen dataclass with a schema
version, validated against the JSON Schema shipped in gemma_export/schemas/). It holds no
timestamps or timings, so the same export gives the same bytes. An export claims its destination
(a lock beside it: a second export to the same place is refused), writes into a staging folder and
renames it into place only when every file and the manifest are complete; on any failure or
interrupt the staging folder is removed, so a failed export leaves nothing at the destination.
This module imports nothing of gemma-export but its errors.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .errors import ArtifactError, ConfigError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 3
SCHEMA = Path(__file__).parent / "schemas" / f"manifest-{MANIFEST_VERSION}.json"
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
    sha256: str  # of the tokenizer the model was loaded with: the shipped file must be that one


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
    files: dict[str, FileEntry] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION
    # image prompts (models with a vision encoder): {"vision": VisionConfig dict, "preprocessing":
    # ImageSettings dict, "entry_points": {role: name}}; absent for a text-only artifact
    images: dict | None = None

    @property
    def recipe_name(self) -> str:
        return self.recipe.get("name", "fp32")

    @property
    def kv_dtype(self) -> str:
        """What the KV caches hold (the recipe's kv_dtype; manifests before it: fp32)."""
        return self.recipe.get("kv_dtype", "fp32")

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
        if d["images"] is None:
            del d["images"]
        return {"manifest_version": d.pop("manifest_version"), **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        version = d.get("manifest_version")
        if version != MANIFEST_VERSION:
            raise ArtifactError(f"{where}: manifest version {version!r}, this gemma-export reads version "
                                f"{MANIFEST_VERSION}; re-export the artifact")
        if problems := schema_problems(d):
            raise ArtifactError(f"{where}: manifest does not match its schema ({problems[0]})")
        try:
            return cls(**{**d, "model": ModelInfo(**d["model"]),
                          "tokenizer": TokenizerInfo(**{**d["tokenizer"], "stop": tuple(d["tokenizer"]["stop"])}),
                          "cache_lengths": tuple(d["cache_lengths"]),
                          "files": {k: FileEntry(**v) for k, v in d["files"].items()}})
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{where}: manifest does not match its schema ({type(e).__name__}: {e})") from None


@functools.cache
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))


def schema_problems(d) -> list[str]:
    """Where a manifest document breaks the versioned JSON Schema, one line each (none: valid)."""
    return [f"{'/'.join(map(str, e.absolute_path)) or 'top level'}: {e.message}"
            for e in sorted(_validator().iter_errors(d), key=lambda e: list(map(str, e.absolute_path)))]


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path}: corrupt {what} ({type(e).__name__}: {str(e)[:120]})") from None


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
    """An artifact may be written to `out`: it is new, or (with force) an artifact folder or empty;
    its parent exists or can be made, and is a writable folder."""
    out = Path(out)
    if out.exists():
        if not force:
            raise ConfigError(f"{out} already exists; choose another --out or pass --force")
        if not out.is_dir() or (not (out / MANIFEST).is_file() and any(out.iterdir())):
            raise ConfigError(f"{out} exists and is not an artifact folder; refusing to replace it")
    _check_parent(out)


def _check_parent(path: Path) -> None:
    """`path`'s folder exists or can be made (its nearest existing ancestor is a writable folder)."""
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise ConfigError(f"{path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or _read_only_fs(parent):
        raise ConfigError(f"{path}: cannot write in {parent} (permission denied or read-only file system)")


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_only_fs(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def check_writable_file(path: Path) -> None:
    """A file may be written at `path` later (its folder exists or can be made, and is writable)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name")
    _check_parent(path)


def check_free_space(outs: list[Path], needed: int) -> None:
    """Refuse before any work when the file system under the destinations has less free space than
    the artifacts are estimated to need."""
    parent = _existing_ancestor(Path(outs[0]).parent)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConfigError(f"{outs[0]}: {free / 2**20:,.0f} MiB free on {parent}'s file system, the export needs "
                          f"about {needed / 2**20:,.0f} MiB; free space or choose another --out")


@contextmanager
def claim(out: Path):
    """Hold `out` for one export: parents made (and removed again on failure if we made them), a
    lock file beside it that a second export finds taken. The lock is an flock, so it dies with
    its process; the file is removed when the claim ends."""
    out = Path(out)
    made = _make_parents(out.parent, out)
    lock_path = out.parent / f".{out.name}.lock"
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError as e:
        _remove_made(made)
        raise ConfigError(f"{out}: cannot write in {out.parent} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{out}: another export is writing there right now ({lock_path} is held); "
                          "wait for it or choose another --out") from None
    ok = False
    try:
        yield
        ok = True
    finally:
        with _signals_held():
            try:
                os.unlink(lock_path)
            except FileNotFoundError:
                pass
            os.close(fd)
            if not ok:
                _remove_made(made)


def _make_parents(folder: Path, out: Path) -> list[Path]:
    """mkdir -p for `out`'s folder, returning the folders it made (deepest last)."""
    made, missing = [], []
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            _remove_made(made)
            raise ConfigError(f"{out}: cannot create {path} ({e.strerror})") from None
        made.append(path)
    return made


def _remove_made(made: list[Path]) -> None:
    for path in reversed(made):
        try:
            path.rmdir()
        except OSError:
            break  # someone else put something there: leave it


@contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM while cleaning up, so a second Ctrl-C cannot leave half a cleanup."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (ValueError, OSError):  # not the main thread's business on some platforms
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def staging(out: Path, force: bool = False):
    """Yield a temporary folder that becomes `out` only if the block completes. The folder and its
    files get the permissions the user's umask gives any new file (not the temporary folder's 700)."""
    out = Path(out)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException as e:
        with _signals_held():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and (full := disk_full(e, out.parent)):
            raise ArtifactError(f"{out}: {full} while writing; nothing was left at {out}") from None
        raise


def disk_full(e: BaseException, where: Path | None = None) -> str | None:
    """'no space left on the device' / 'file size limit reached' when an exception (or one it was
    raised from: exporters wrap OSErrors) comes from a full disk or quota, else None. numpy's
    tofile drops the errno ("problem writing element N to file"): then the file size limit and
    the free space at `where` tell."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on the device"
        if isinstance(e, OSError) and e.errno == errno.EFBIG:
            return "file size limit reached"
        text = str(e)
        if "No space left on device" in text:
            return "no space left on the device"
        if "File too large" in text:
            return "file size limit reached"
        if "problem writing element" in text and where is not None:
            if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
                return "file size limit reached"
            if shutil.disk_usage(where).free < 2**20:
                return "no space left on the device"
        e = e.__cause__ or e.__context__
    return None


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Folders and files as `mkdir` and `open` would make them under the current umask (files
    that are executable stay executable)."""
    mask = umask()
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        path.chmod((0o777 if executable else 0o666) & ~mask)


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Record the size and sha256 of every file in `folder` and write manifest.json there."""
    folder = Path(folder)
    files = {}
    for name in _files(folder):
        path = folder / name
        files[name] = FileEntry(path.stat().st_size, sha256_file(path))
    manifest = dataclasses.replace(manifest, files=files, manifest_version=MANIFEST_VERSION)
    (folder / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest
