"""`gemma-export lint`: is an artifact folder complete and labelled truthfully, before it ships?

Checks, each reported as one line (all of them, not the first only):
  schema      manifest.json parses and validates against the versioned JSON Schema
  files       every file listed with its size and sha256, nothing unlisted, every named file listed
  tokenizer   the shipped tokenizer is the model's (sha256), its vocabulary fits the model's, and
              BOS / EOS / stop tokens / chat template are present and agree with it
  recipe      a quantized artifact names its recipe, and a calibrated one its calibration set
  entry points  every entry point the manifest declares exists in the model file with the same
              tensors, shapes and dtypes (read from the file, not from the manifest)

Runs at the end of every export and before `verify`. Library code: returns a report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import backends
from .artifact import MANIFEST, MANIFEST_VERSION, Manifest, _files, read_json, schema_problems, sha256_file
from .errors import ArtifactError, ExportError
from .gemma3 import family
from .loading import Tokenizer
from .quant.recipes import QuantRecipe


@dataclass(frozen=True)
class Problem:
    check: str
    message: str

    def line(self) -> str:
        return f"{self.check}: {self.message}"


@dataclass(frozen=True)
class LintReport:
    artifact: str
    format: str | None
    problems: tuple[Problem, ...]

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "format": self.format, "pass": self.passed,
                "manifest_version": MANIFEST_VERSION,
                "problems": [{"check": p.check, "message": p.message} for p in self.problems]}

    def raise_if_failed(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more; run gemma-export lint)" if len(self.problems) > 1 else ""
            raise ArtifactError(f"{self.artifact}: {self.problems[0].line()}{more}")


def lint(folder: str | Path) -> LintReport:
    folder = Path(folder)
    problems: list[Problem] = []
    manifest = _manifest(folder, problems)
    if manifest is None:
        return LintReport(str(folder), None, tuple(problems))
    for check in (_files_check, _tokenizer_check, _recipe_check, _entry_points_check):
        try:
            problems += check(folder, manifest)
        except ExportError as e:
            problems.append(Problem(check.__name__.strip("_").removesuffix("_check").replace("_", " "), str(e)))
    return LintReport(str(folder), manifest.format, tuple(problems))


def _manifest(folder: Path, problems: list) -> Manifest | None:
    path = folder / MANIFEST
    if not folder.is_dir():
        problems.append(Problem("schema", f"{folder} is not a folder"))
        return None
    try:
        d = read_json(path, f"no {MANIFEST}", "manifest")
    except ArtifactError as e:
        problems.append(Problem("schema", str(e)))
        return None
    if not isinstance(d, dict):
        problems.append(Problem("schema", f"{MANIFEST} is not a JSON object"))
        return None
    if d.get("manifest_version") != MANIFEST_VERSION:
        problems.append(Problem("schema", f"manifest version {d.get('manifest_version')!r}, this gemma-export "
                                          f"reads version {MANIFEST_VERSION}; re-export the artifact"))
        return None
    found = schema_problems(d)
    problems += [Problem("schema", p) for p in found]
    if found:
        return None
    return Manifest.from_dict(d, str(path))


def _files_check(folder: Path, m: Manifest) -> list[Problem]:
    out = []
    for name in m.named_files():
        if name not in m.files:
            out.append(Problem("files", f"the manifest names {name} but does not list it with a size and sha256"))
    for name, info in m.files.items():
        path = folder / name
        if not path.is_file():
            out.append(Problem("files", f"{name} is listed but missing"))
        elif path.stat().st_size != info.bytes:
            out.append(Problem("files", f"{name}: {path.stat().st_size} bytes, the manifest says {info.bytes}"))
        elif sha256_file(path) != info.sha256:
            out.append(Problem("files", f"{name}: sha256 does not match the manifest"))
    for name in _files(folder):
        if name not in m.files:
            out.append(Problem("files", f"{name} is not listed in the manifest"))
    return out


def _tokenizer_check(folder: Path, m: Manifest) -> list[Problem]:
    t, out = m.tokenizer, []
    path = folder / t.file
    if not path.is_file():
        return [Problem("tokenizer", f"{t.file} is missing")]
    if sha256_file(path) != t.sha256:
        out.append(Problem("tokenizer", f"{t.file} is not the tokenizer the model was exported with (sha256 differs)"))
    tok = Tokenizer(path)
    if tok.vocab_size > m.vocab_size:
        out.append(Problem("tokenizer", f"the tokenizer has {tok.vocab_size:,} tokens, the model's vocabulary "
                                        f"{m.vocab_size:,}: token ids past it have no logits"))
    if (tok.bos_id, tok.eos_id) != (t.bos, t.eos):
        out.append(Problem("tokenizer", f"BOS/EOS ids {t.bos}/{t.eos} in the manifest, {tok.bos_id}/{tok.eos_id} "
                                        "in the tokenizer"))
    missing = [s for s in family.STOP_TOKENS if s not in t.stop]
    if missing:
        out.append(Problem("tokenizer", f"stop tokens {', '.join(missing)} missing (generation would not stop)"))
    if family.SPECIAL_TOKENS["start_of_turn"] not in t.chat_template:
        out.append(Problem("tokenizer", "the chat template has no <start_of_turn>: not Gemma's chat format"))
    return out


def _recipe_check(folder: Path, m: Manifest) -> list[Problem]:
    try:
        recipe = QuantRecipe.from_dict(m.recipe)
    except (ExportError, KeyError, TypeError, ValueError) as e:
        return [Problem("recipe", f"the recipe does not parse ({e})")]
    if recipe.is_float:
        return []
    out = []
    if not m.quantization.get("quantized_modules"):
        out.append(Problem("recipe", f"recipe {recipe.name} quantizes weights but the manifest records no "
                                     "quantized modules"))
    if recipe.needs_calibration and not m.quantization.get("calibration_sha256"):
        out.append(Problem("recipe", f"recipe {recipe.name} is calibrated but no calibration-set sha256 is recorded"))
    return out


def _entry_points_check(folder: Path, m: Manifest) -> list[Problem]:
    declared = backends.get(m.format).declared_io(folder, m)
    out = []
    for entry, io in m.entry_points.items():
        if entry not in declared:
            out.append(Problem("entry points", f"{entry} is not in {m.program['file']} (it has "
                                               f"{', '.join(sorted(declared)) or 'none'})"))
            continue
        for side in ("inputs", "outputs"):
            out += [Problem("entry points", f"{entry} {side}: {msg}")
                    for msg in _compare(io[side], declared[entry][side])]
    signatures = m.program.get("signatures")
    if signatures is not None:  # the decoder's signatures and the models of any other bundle sections
        signatures = [*signatures, *m.program.get("sections", ())]
    if signatures is not None and sorted(signatures) != sorted(declared):
        out.append(Problem("entry points", f"the manifest lists signatures {sorted(signatures)}, the file has "
                                           f"{sorted(declared)}"))
    return out


def _compare(claimed: list[dict], actual: list[dict]) -> list[str]:
    """Tensors by name where the file names them, else by position."""
    named = all(a["name"] is not None for a in actual)
    by_name = {a["name"]: a for a in actual} if named else {}
    out = []
    if named:
        extra = sorted(set(by_name) - {c["name"] for c in claimed})
        if extra:
            out.append(f"{', '.join(extra)} in the file, not in the manifest")
    elif len(claimed) != len(actual):
        return [f"{len(claimed)} in the manifest, {len(actual)} in the file"]
    for i, c in enumerate(claimed):
        a = by_name.get(c["name"]) if named else actual[i]
        if a is None:
            out.append(f"{c['name']} is not in the file")
            continue
        if c["dtype"] != a["dtype"]:
            out.append(f"{c['name']}: dtype {c['dtype']} in the manifest, {a['dtype']} in the file")
        if not _same_shape(c["shape"], a["shape"]):
            out.append(f"{c['name']}: shape {c['shape']} in the manifest, {a['shape']} in the file")
    return out


def _same_shape(claimed: list, actual: list) -> bool:
    """A dynamic dimension (a name) matches any dynamic dimension; sizes must be equal."""
    return len(claimed) == len(actual) and all(
        (isinstance(c, str) and isinstance(a, str)) or c == a for c, a in zip(claimed, actual))
