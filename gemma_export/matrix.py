"""`gemma-export matrix BUILD.toml`: a release described as data, fanned out as jobs for the CI's
own matrix (GitHub Actions, GitLab CI, Buildkite: not a scheduler of ours).

A release description:

    [release]
    name = "gemma3-2026.12"
    context = 4096            # --max-context of every artifact (optional)
    prefill_len = 128         # optional
    out = "dist"              # where artifacts go, OUT/NAME/MODEL/RECIPE[/FORMAT] (optional)

    [[model]]
    ref = "gemma3-270m"       # a preset, a Hugging Face folder or a .gguf (relative to this file)
    [[model]]
    ref = "gemma3-1b"
    random_weights = true

    [matrix]
    recipes = ["int8", "int4-b32"]
    formats = ["onnx", "tflite", "pte"]

    [verify]                  # optional: replace the judge's bounds (reported in each report)
    min_top1 = 0.9
    max_mean_kl = 0.05

One job per (model, recipe) when the recipe is calibrated (the formats share one calibration in one
process), else one job per (model, recipe, format). Every job carries its commands: export (with a
build record beside the artifacts), lint, and verify, whose exit code gates the release. Cells a
format cannot lower are refused here, before any runner starts.
"""

from __future__ import annotations

import shlex
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from . import backends
from .errors import ConfigError, ExportError
from .quant.recipes import resolve

_SECTIONS = {"release": {"name", "context", "prefill_len", "out"}, "model": {"ref", "random_weights", "seed"},
             "matrix": {"recipes", "formats"}, "verify": {"min_top1", "max_mean_kl", "positions"}}


@dataclass(frozen=True)
class ModelEntry:
    ref: str
    random_weights: bool = False
    seed: int = 0

    @property
    def slug(self) -> str:
        return Path(self.ref).stem if ("/" in self.ref or self.ref.endswith(".gguf")) else self.ref


@dataclass(frozen=True)
class Release:
    name: str
    models: tuple[ModelEntry, ...]
    recipes: tuple[str, ...]
    formats: tuple[str, ...]
    context: int | None = None
    prefill_len: int | None = None
    out: str = "dist"
    verify: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Job:
    id: str
    model: str
    recipe: str
    formats: tuple[str, ...]
    out: str  # the artifact folder (one format) or the build folder holding OUT/FORMAT
    calibrated: bool
    export: str
    lint: str
    verify: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["formats"] = ",".join(self.formats)
        return d


def read_release(path: str | Path) -> Release:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: release description not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}]; sections: {', '.join(_SECTIONS)}")
    for section, keys in _SECTIONS.items():
        for table in _tables(data.get(section, {}), path, section):
            extra = sorted(set(table) - keys)
            if extra:
                raise ConfigError(f"{path}: unknown key {extra[0]!r} in [{section}]; known: {', '.join(sorted(keys))}")
    release = data.get("release", {})
    matrix = data.get("matrix", {})
    models = data.get("model", [])
    if not models:
        raise ConfigError(f"{path}: no [[model]] entries")
    entries = []
    for m in models:
        if not isinstance(m.get("ref"), str) or not m["ref"]:
            raise ConfigError(f"{path}: every [[model]] needs ref = \"a preset, folder or .gguf\"")
        ref = m["ref"]
        if ("/" in ref or ref.endswith(".gguf")) and not Path(ref).is_absolute():
            ref = str((path.parent / ref).resolve())
        entries.append(ModelEntry(ref, _typed(m, "random_weights", bool, False, path),
                                  _typed(m, "seed", int, 0, path)))
    recipes = tuple(_strings(matrix, "recipes", path))
    formats = tuple(backends.canonical(f) for f in _strings(matrix, "formats", path))
    for r in recipes:
        if r.endswith((".toml", ".json")) and not Path(r).is_absolute():
            recipes = tuple(str((path.parent / x).resolve()) if x == r else x for x in recipes)
    verify = tuple(sorted((k, v) for k, v in data.get("verify", {}).items()))
    for k, v in verify:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"{path}: [verify] {k} must be a number, got {v!r}")
    return Release(name=_typed(release, "name", str, path.stem, path), models=tuple(entries), recipes=recipes,
                   formats=formats, context=_typed(release, "context", int, None, path),
                   prefill_len=_typed(release, "prefill_len", int, None, path),
                   out=_typed(release, "out", str, "dist", path), verify=verify)


def _tables(value, path, section):
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    raise ConfigError(f"{path}: [{section}] must be a table")


def _typed(table: dict, key: str, kind, default, path):
    value = table.get(key, default)
    if value is not default and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ConfigError(f"{path}: {key} must be {kind.__name__}, got {value!r}")
    return value


def _strings(table: dict, key: str, path) -> list[str]:
    value = table.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: [matrix] {key} must be a non-empty list of names")
    if len(set(value)) < len(value):
        raise ConfigError(f"{path}: [matrix] {key} names something twice")
    return value


def plan(release: Release) -> list[Job]:
    """The jobs, refusing any cell a format cannot lower before a runner starts."""
    jobs = []
    for model in release.models:
        for recipe_ref in release.recipes:
            recipe = resolve(recipe_ref)
            for fmt in release.formats:
                try:
                    backends.check_support(fmt, recipe)
                except ExportError as e:
                    raise ConfigError(f"release {release.name}: {model.slug} x {recipe.name} x {fmt}: {e}") from None
            groups = [release.formats] if recipe.needs_calibration else [(f,) for f in release.formats]
            for formats in groups:
                jobs.append(_job(release, model, recipe_ref, recipe.name, formats, recipe.needs_calibration))
    return jobs


def _job(release: Release, model: ModelEntry, recipe_ref: str, recipe: str, formats, calibrated: bool) -> Job:
    base = Path(release.out) / release.name / model.slug / recipe
    out = base if len(formats) > 1 else base / formats[0]
    ident = "-".join([model.slug, recipe, *formats])
    export = ["gemma-export", "export", model.ref, "--format", ",".join(formats), "--recipe", recipe_ref,
              "--out", str(out), "--build-record", f"{out}.build.json"]
    if model.random_weights:
        export += ["--random-weights", "--weights-seed", str(model.seed)]
    if release.context:
        export += ["--max-context", str(release.context)]
    if release.prefill_len:
        export += ["--prefill-len", str(release.prefill_len)]
    flags = {"min_top1": "--min-top1", "max_mean_kl": "--max-mean-kl", "positions": "--positions"}
    verify = ["gemma-export", "verify", "--all", str(out), "--report", f"{out}.report"]
    for key, value in release.verify:
        verify += [flags[key], str(value)]
    lint = ["gemma-export", "lint", *(str(out / f) if len(formats) > 1 else str(out) for f in formats)]
    return Job(ident, model.ref, recipe, tuple(formats), str(out), calibrated, shlex.join(export),
               shlex.join(lint), shlex.join(verify))


def github_matrix(jobs: list[Job]) -> dict:
    """The `strategy.matrix` object of a GitHub Actions job: one `include` entry per job."""
    return {"include": [j.to_dict() for j in jobs]}
