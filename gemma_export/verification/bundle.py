"""Golden bundles: fixed inputs and PyTorch reference outputs, to run an artifact anywhere.

A bundle folder holds
  index.json        what is where: the artifact (name, format, manifest sha256s), the call
                    sequence, how it is judged, the input and output file layouts
  inputs.npz        the golden inputs, and the same arrays as raw little-endian files in inputs/
  reference.npz     the judge's reference outputs: top-K logits (values + vocabulary ids) at every
                    position, full logits at a few positions, greedy tokens
  baseline.npz      for recipes judged relative to the recipe (the runtime quantizes activations):
                    the recipe in PyTorch run like a device, against an fp32 reference.npz
  run_on_device.sh  pushes artifact + inputs to an adb-connected phone, runs the format's runner,
                    pulls the outputs back

An artifact with image entry points also gets image prompts (`image{i}_*`): the prompt's token
ids with the soft tokens in place, its views' pixels, and the reference's greedy tokens to feed
after it; the runner reports the logits after the prompt and after each of those tokens.

A runner (on a phone, in a simulator, or `run_bundle` here on the desktop) writes the files of
`OUTPUTS` into an outputs folder; `check_outputs` compares them with the reference outputs and
asks the judge, with the same rule `verify` applies to the artifact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import backends
from ..artifact import MANIFEST, Manifest, check_files, read_json, read_manifest, sha256_file, staging
from ..errors import ArtifactError, ConfigError
from ..loading import Tokenizer
from ..runtime import open_artifact, reference_for
from ..session import generate
from . import stock
from .check import image_prompts
from .judge import Rule, Verdict, judge
from .metrics import Comparison
from .parity import image_run, reference_image_run

BUNDLE_VERSION = 2
INDEX = "index.json"
INPUTS_NPZ = "inputs.npz"
INPUTS_DIR = "inputs"
REFERENCE_NPZ = "reference.npz"
BASELINE_NPZ = "baseline.npz"
OUTPUTS_NPZ = "outputs.npz"  # accepted instead of the .bin files
SCRIPT = "run_on_device.sh"
# arrays a runner reads (all int32) and writes; shapes use N positions, C calls, K, F, P, G, V
INPUTS = ("tokens", "calls", "ref_topk_indices", "full_positions", "prompt", "new_tokens")
OUTPUTS = {"topk_values": "float32", "topk_indices": "int32", "at_reference": "float32",
           "full_logits": "float32", "greedy_tokens": "int32"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BundlePlan:
    text: Path
    positions: int | None = None  # None: two windows plus a prefill chunk, within the max context
    new_tokens: int = 32
    prompt: str = "The capital of France is"
    topk: int = 64
    reference: str | None = None  # None: the model the artifact came from
    threads: int = 2
    images: tuple | None = ()  # image paths for an artifact with images (() the default photographs, None none)


IMAGE_NEW_TOKENS = 8  # tokens an image prompt is followed along (each costs a full row of logits)


def call_plan(n: int, prefill_len: int) -> np.ndarray:
    """(pos, n) per call: full prefill chunks over the first half (at least one chunk), then decode
    steps, the way a phone app runs a prompt and then generates."""
    prefilled = min(n, prefill_len * max(1, (n // 2) // prefill_len))
    calls = [(p, min(prefill_len, prefilled - p)) for p in range(0, prefilled, prefill_len)]
    calls += [(p, 1) for p in range(prefilled, n)]
    return np.asarray(calls, dtype=np.int32).reshape(-1, 2)


def full_positions_for(n: int, window: int) -> list[int]:
    """A handful of positions whose full logits are kept: the first, both sides of the window, the last."""
    return sorted({p for p in (0, window - 1, window, n - 1) if 0 <= p < n})


def default_positions(manifest: Manifest) -> int:
    return min(2 * manifest.window + manifest.prefill_len, manifest.max_context)


# ----------------------------------------------------------------------------------------------
# Running a bundle's inputs through a Session (the reference, or the artifact's desktop runtime)
# ----------------------------------------------------------------------------------------------


def _topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argpartition(logits, -k, axis=-1)[:, -k:]
    vals = np.take_along_axis(logits, idx, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(vals, order, -1), np.take_along_axis(idx, order, -1).astype(np.int32)


def collect(session, inputs: dict, k: int, ref_indices: np.ndarray | None = None) -> dict:
    """Run the call sequence and the greedy run; return the output arrays of `OUTPUTS`."""
    tokens, full = inputs["tokens"], set(inputs["full_positions"].tolist())
    n = len(tokens)
    topv = np.zeros((n, k), np.float32)
    topi = np.zeros((n, k), np.int32)
    at_ref = np.zeros((n, k), np.float32)
    full_logits = {}
    session.reset()
    for pos, size in inputs["calls"].tolist():
        if size > 1:
            logits = session.prefill(tokens[pos:pos + size].tolist(), pos)
        else:
            logits = session.decode(int(tokens[pos]), pos)[None, :]
        logits = np.asarray(logits, dtype=np.float32)
        sl = slice(pos, pos + size)
        topv[sl], topi[sl] = _topk(logits, k)
        if ref_indices is not None:
            at_ref[sl] = np.take_along_axis(logits, ref_indices[sl].astype(np.int64), -1)
        full_logits.update({p: logits[p - pos] for p in range(pos, pos + size) if p in full})
    greedy = list(generate(session, inputs["prompt"].tolist(), int(inputs["new_tokens"][0])))
    return {"topk_values": topv, "topk_indices": topi, "at_reference": at_ref if ref_indices is not None else topv,
            "full_logits": np.stack([full_logits[p] for p in inputs["full_positions"].tolist()]),
            "greedy_tokens": np.asarray(greedy, dtype=np.int32)}


# ----------------------------------------------------------------------------------------------
# Writing a bundle
# ----------------------------------------------------------------------------------------------


def _spec(arr: np.ndarray, file: str) -> dict:
    return {"file": file, "dtype": arr.dtype.name, "shape": list(arr.shape)}


def _golden_inputs(manifest: Manifest, tok: Tokenizer, plan: BundlePlan) -> dict:
    n = plan.positions or default_positions(manifest)
    ids = tok.encode(Path(plan.text).read_text())[:n]
    if len(ids) < n:
        raise ConfigError(f"{plan.text}: {len(ids)} tokens, fewer than the {n} positions asked for")
    if n > manifest.max_context:
        raise ConfigError(f"{n} positions exceed the artifact's max context {manifest.max_context}")
    if not 2 <= plan.topk <= manifest.vocab_size:
        raise ConfigError(f"top-k must be between 2 and the vocabulary size, got {plan.topk}")
    return {"tokens": np.asarray(ids, np.int32), "calls": call_plan(n, manifest.prefill_len),
            "full_positions": np.asarray(full_positions_for(n, manifest.window), np.int32),
            "prompt": np.asarray(tok.encode(plan.prompt), np.int32),
            "new_tokens": np.asarray([plan.new_tokens], np.int32)}


def make_bundle(artifact: str | Path, out: str | Path, plan: BundlePlan, progress: Progress = lambda m: None) -> dict:
    """Golden inputs + reference outputs for an artifact, written atomically into `out`."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    check_files(artifact, manifest, hashes=True)
    inputs = _golden_inputs(manifest, Tokenizer(artifact / manifest.tokenizer.file), plan)
    rule = Rule.for_recipe(manifest.recipe)
    n = len(inputs["tokens"])
    progress(f"running the reference over {n} positions and {plan.new_tokens} greedy tokens")
    # the judge's reference: the recipe in PyTorch, or fp32 when judged relative to the recipe
    ref = reference_for(manifest, not rule.relative, plan.reference, plan.threads)
    reference = collect(ref.session, inputs, plan.topk)
    inputs["ref_topk_indices"] = reference["topk_indices"]
    baseline = None
    if rule.relative:
        progress("running the recipe in PyTorch the same way (the relative judgement's baseline)")
        recipe = reference_for(manifest, True, plan.reference, plan.threads)
        baseline = (recipe.description, collect(recipe.session, inputs, plan.topk, inputs["ref_topk_indices"]))
    images = _image_prompts(manifest, ref, plan, progress)
    for name, (_, _, arrays, logits, tokens) in images.items():
        inputs.update(arrays)
        reference[f"{name}_logits"], reference[f"{name}_tokens"] = logits, tokens
    index = _index(artifact, manifest, plan, inputs, (ref.description, reference), baseline, images)
    if backends.get(manifest.format).runner.stock_args:  # a target with no stock LLM tool gets no stock script
        index["stock"] = stock.stock_record(manifest, ref.tokenizer, plan.prompt, reference["greedy_tokens"].tolist())
    with staging(Path(out)) as tmp:
        np.savez(tmp / INPUTS_NPZ, **inputs)
        (tmp / INPUTS_DIR).mkdir()
        for k, spec in index["inputs"]["arrays"].items():
            inputs[k].astype(np.dtype(spec["dtype"]).newbyteorder("<")).tofile(tmp / spec["file"])
        np.savez(tmp / REFERENCE_NPZ, **{k: v for k, v in reference.items() if k != "at_reference"})
        if baseline is not None:
            np.savez(tmp / BASELINE_NPZ, **baseline[1])
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
        scripts = [(SCRIPT, runner_script(index, sha256_file(tmp / INDEX)))]
        if "stock" in index:
            scripts.append((stock.STOCK_SCRIPT, stock.stock_script(index, sha256_file(tmp / INDEX))))
            (tmp / stock.STOCK_PROMPT).write_text(index["stock"]["prompt"])
        for name, text in scripts:
            (tmp / name).write_text(text)
            (tmp / name).chmod(0o755)
    progress(f"wrote {out}")
    return index


def _image_prompts(manifest: Manifest, ref, plan: BundlePlan, progress: Progress) -> dict:
    """{image{i}: (label, views, input arrays, reference logits, reference tokens)} for an artifact with image
    entry points (the prompts `verify` runs); empty without them or with `images=None`."""
    if manifest.images is None or plan.images is None:
        return {}
    vision = ref.vision() if ref.vision is not None else None
    if vision is None:
        raise ArtifactError(f"the reference {ref.description} has no vision encoder for the image prompts")
    out = {}
    prompts = image_prompts(manifest, ref.tokenizer, plan.images, plan.prompt, progress)
    for i, (label, p) in enumerate(prompts.items()):
        progress(f"running the reference on the {label} prompt ({len(p.ids)} tokens, {sum(p.views)} views)")
        logits, tokens = reference_image_run(ref.session, vision, p, IMAGE_NEW_TOKENS, ref.tokenizer.stop_ids)
        name = f"image{i}"
        arrays = {f"{name}_prompt": np.asarray(p.ids, np.int32), f"{name}_pixels": p.pixels.astype(np.float32),
                  f"{name}_teacher": tokens[:-1]}
        out[name] = (label, sum(p.views), arrays, logits, tokens)
    return out


def _index(artifact: Path, manifest: Manifest, plan: BundlePlan, inputs: dict, reference: tuple,
           baseline: tuple | None, images: dict | None = None) -> dict:
    calls = inputs["calls"]
    outputs = reference[1]
    index = {
        "bundle_version": BUNDLE_VERSION,
        "artifact": {"name": artifact.resolve().name, "format": manifest.format, "recipe": manifest.recipe_name,
                     "manifest_sha256": sha256_file(artifact / MANIFEST),
                     "files": {k: v.sha256 for k, v in manifest.files.items()},
                     "prefill_len": manifest.prefill_len, "max_context": manifest.max_context,
                     "window": manifest.window, "vocab_size": manifest.vocab_size},
        "recipe": manifest.recipe,
        "reference": {"description": reference[0], "file": REFERENCE_NPZ,
                      "arrays": {k: _spec(v, REFERENCE_NPZ) for k, v in outputs.items() if k != "at_reference"}},
        "text": str(plan.text), "prompt": plan.prompt, "topk": plan.topk,
        "positions": len(inputs["tokens"]), "full_positions": inputs["full_positions"].tolist(),
        "greedy": {"prompt_tokens": len(inputs["prompt"]), "new_tokens": plan.new_tokens},
        "calls": {"prefill": int((calls[:, 1] > 1).sum()), "decode": int((calls[:, 1] == 1).sum()),
                  "sequence": calls.tolist()},
        "inputs": {"npz": INPUTS_NPZ, "arrays": {k: _spec(inputs[k], f"{INPUTS_DIR}/{k}.bin")
                                                 for k in (*INPUTS, *(k for k in inputs if k not in INPUTS))}},
        "outputs": {k: {"file": f"{k}.bin", "dtype": dt, "shape": list(outputs[k].shape)} for k, dt in OUTPUTS.items()},
        "runner": {"script": SCRIPT, "env": backends.get(manifest.format).runner.env},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if baseline is not None:
        index["baseline"] = {"description": baseline[0], "file": BASELINE_NPZ,
                             "arrays": {k: _spec(v, BASELINE_NPZ) for k, v in baseline[1].items()}}
    if images:
        index["images"] = {"vision": manifest.images["vision"], "new_tokens": IMAGE_NEW_TOKENS,
                           "prompts": {name: {"label": label, "views": views, "tokens": len(arrays[f"{name}_prompt"])}
                                       for name, (label, views, arrays, _, _) in images.items()}}
        for name, (_, _, _, logits, _) in images.items():
            index["outputs"][f"{name}_logits"] = {"file": f"{name}_logits.bin", "dtype": "float32",
                                                  "shape": list(logits.shape)}
    return index


def read_index(bundle_dir: str | Path) -> dict:
    path = Path(bundle_dir) / INDEX
    index = read_json(path, f"{bundle_dir}: no {INDEX}; not a golden bundle", "bundle index")
    if index.get("bundle_version") != BUNDLE_VERSION:
        raise ArtifactError(f"{path}: not a golden bundle index of this gemma-export "
                            f"(bundle_version {index.get('bundle_version')!r}, reads {BUNDLE_VERSION})")
    return index


def check_artifact(artifact: str | Path, index: dict) -> None:
    """The artifact is the one the bundle was made from (same manifest.json, byte for byte)."""
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{artifact}: no {MANIFEST}; not an artifact folder")
    a = index["artifact"]
    if sha256_file(path) != a["manifest_sha256"]:
        raise ArtifactError(f"{artifact}: not the artifact this bundle was made from "
                            f"({a['format']} artifact {a['name']}; manifest sha256 differs)")


def _read_arrays(folder: Path, npz: str, specs: dict, what: str) -> dict:
    """Arrays from folder/npz if present, else from the raw little-endian files the specs name."""
    out = {}
    packed = np.load(folder / npz) if (folder / npz).is_file() else None
    for name, spec in specs.items():
        if packed is not None and name in packed:
            arr = packed[name]
        else:
            path = folder / spec["file"]
            if not path.is_file():
                raise ArtifactError(f"{path}: missing; {what} must hold {', '.join(s['file'] for s in specs.values())}")
            arr = np.fromfile(path, dtype=np.dtype(spec["dtype"]).newbyteorder("<"))
        if arr.size != int(np.prod(spec["shape"])):
            raise ArtifactError(f"{folder / spec['file']}: {arr.size} values, expected shape {spec['shape']}")
        out[name] = arr.reshape(spec["shape"]).astype(spec["dtype"])
    return out


def read_inputs(bundle_dir: str | Path, index: dict) -> dict:
    return _read_arrays(Path(bundle_dir), INPUTS_NPZ, index["inputs"]["arrays"], "a bundle")


# ----------------------------------------------------------------------------------------------
# The desktop runner
# ----------------------------------------------------------------------------------------------


def run_bundle(bundle_dir: str | Path, artifact: str | Path, out: str | Path, threads: int = 2,
               stock_runtime: bool = False) -> dict:
    """Produce a bundle's outputs with the artifact's desktop runtime, in the device file layout;
    with `stock_runtime`, the text the runtime's own LLM API generates (as the phone's tool would)."""
    bundle_dir, out = Path(bundle_dir), Path(out)
    index = read_index(bundle_dir)
    check_artifact(artifact, index)
    if stock_runtime:
        info = {"bundle": str(bundle_dir.resolve()), "bundle_sha256": sha256_file(bundle_dir / INDEX),
                **stock.run_stock(bundle_dir, Path(artifact), out, index), "artifact": str(Path(artifact).resolve())}
        (out / INDEX).write_text(json.dumps(info, indent=2))
        return info
    opened = open_artifact(artifact, threads, hashes=True)
    inputs = read_inputs(bundle_dir, index)
    outputs = collect(opened.session, inputs, index["topk"], inputs["ref_topk_indices"])
    if "images" in index:
        from ..gemma3.vision import VisionConfig
        from ..multimodal import ImagePrompt

        vc = VisionConfig.from_dict(index["images"]["vision"])
        for name in index["images"]["prompts"]:
            ids, pixels = tuple(inputs[f"{name}_prompt"].tolist()), inputs[f"{name}_pixels"]
            outputs[f"{name}_logits"] = image_run(opened.session, vc, ImagePrompt(ids, pixels, (len(pixels),)),
                                                  inputs[f"{name}_teacher"].tolist())
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in index["outputs"].items():
        outputs[name].astype(np.dtype(spec["dtype"]).newbyteorder("<")).tofile(out / spec["file"])
    info = {"bundle": str(bundle_dir.resolve()), "bundle_sha256": sha256_file(bundle_dir / INDEX),
            "produced_by": f"gemma-export bundle-run ({index['artifact']['format']} desktop runtime)",
            "artifact": str(Path(artifact).resolve())}
    (out / INDEX).write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------------------------
# Checking outputs produced anywhere
# ----------------------------------------------------------------------------------------------


def find_bundle(outputs_dir: Path) -> Path:
    """The bundle named by the outputs' index.json, else the folder holding the outputs."""
    info = outputs_dir / INDEX
    if info.is_file():
        try:
            named = json.loads(info.read_text()).get("bundle")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ArtifactError(f"{info}: corrupt outputs index ({e})") from None
        if named and (Path(named) / INDEX).is_file():
            return Path(named)
    if (outputs_dir.resolve().parent / INDEX).is_file():
        return outputs_dir.resolve().parent
    raise ConfigError(f"{outputs_dir}: cannot tell which bundle these outputs belong to; pass --bundle")


def _comparisons(index: dict, ref: dict, test: dict) -> dict[str, Comparison]:
    """The judged comparisons of a device run: on the reference's top-K support at every position
    (top-1 and top-5 from each side's own ranking), and the full logits at a few positions."""
    topk = Comparison()
    topk.add(ref["topk_values"], test["at_reference"])
    ri, ti = ref["topk_indices"], test["topk_indices"]
    topk.top1 = (ri[:, 0] == ti[:, 0]).astype(float).tolist()
    k = min(5, ri.shape[1])
    topk.top5 = ((ri[:, :k, None] == ti[:, None, :k]).any(-1).mean(-1)).tolist()
    full = Comparison()
    full.add(ref["full_logits"], test["full_logits"])
    return {f"top-{index['topk']} logits": topk, f"full logits at positions {index['full_positions']}": full}


def _outputs_index_matches(outputs_dir: Path, bundle_dir: Path) -> None:
    info_path = outputs_dir / INDEX
    if info_path.is_file():
        made_from = json.loads(info_path.read_text()).get("bundle_sha256")
        if made_from and made_from != sha256_file(bundle_dir / INDEX):
            raise ArtifactError(f"{outputs_dir}: produced from another bundle than {bundle_dir}")


@dataclass(frozen=True)
class Checked:
    """A runner's outputs judged against a bundle: the JSON-able report and the verdict."""

    report: dict
    verdict: Verdict

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def raise_if_failed(self) -> None:
        self.verdict.raise_if_failed(f"{self.report['outputs']} against bundle {self.report['bundle']}")


def check_outputs(outputs_dir: str | Path, bundle_dir: str | Path | None = None, artifact: str | Path | None = None,
                  overrides: dict | None = None) -> Checked:
    """Compare a runner's outputs with the bundle's reference outputs and judge them."""
    outputs_dir = Path(outputs_dir)
    bundle_dir = Path(bundle_dir) if bundle_dir else find_bundle(outputs_dir)
    index = read_index(bundle_dir)
    _outputs_index_matches(outputs_dir, bundle_dir)
    if artifact:
        check_artifact(artifact, index)
    if (outputs_dir / stock.STOCK_OUTPUT).is_file() and not (outputs_dir / OUTPUTS_NPZ).is_file():
        return _check_stock(outputs_dir, bundle_dir, index)
    ref = _read_arrays(bundle_dir, REFERENCE_NPZ, index["reference"]["arrays"], "a bundle")
    test = _read_arrays(outputs_dir, OUTPUTS_NPZ, index["outputs"], "a runner's outputs folder")
    vocab = index["artifact"]["vocab_size"]
    for name in ("topk_indices", "greedy_tokens"):
        if test[name].size and not (0 <= test[name].min() and test[name].max() < vocab):
            raise ArtifactError(f"{outputs_dir / index['outputs'][name]['file']}: token ids outside the vocabulary")
    rule = Rule.for_recipe(index["recipe"], overrides)
    comparisons = _comparisons(index, ref, test)
    summaries = {label: c.summary() for label, c in comparisons.items()}
    recipe = None
    if rule.relative:
        base = _read_arrays(bundle_dir, BASELINE_NPZ, index["baseline"]["arrays"], "a bundle")
        recipe = {label: c.summary() for label, c in _comparisons(index, ref, base).items()}
    g_ref, g_test = ref["greedy_tokens"].tolist(), test["greedy_tokens"].tolist()
    images = _image_summaries(index, ref, test)
    greedy = {None: (g_ref, g_test)}
    if images and not rule.relative:  # a quantized artifact's image prompts are reported, not judged (as verify)
        greedy.update({label: (s["greedy_reference"], s["greedy_test"]) for label, s in images.items()})
        verdict = judge(rule, {**summaries, **images}, recipe, greedy=greedy)
    else:
        verdict = judge(rule, summaries, recipe, greedy=greedy)
    equal = next((i for i, (a, b) in enumerate(zip(g_ref, g_test)) if a != b), min(len(g_ref), len(g_test)))
    topk, full = summaries.values()
    report = {"outputs": str(outputs_dir), "bundle": str(bundle_dir), "format": index["artifact"]["format"],
              "artifact": index["artifact"]["name"], "reference": index["reference"]["description"],
              "rule": rule.to_dict(), **verdict.to_dict(), "topk": {"k": index["topk"], **topk},
              "full_logits": full, "greedy_tokens": len(g_ref), "greedy_equal_prefix": equal,
              "greedy_equal": g_ref == g_test, "greedy_reference": g_ref, "greedy_test": g_test}
    if images:
        report["images"] = {**images, "judged": not rule.relative}
    return Checked(report, verdict)


def _image_summaries(index: dict, ref: dict, test: dict) -> dict:
    """Each image prompt's logits after the prompt and along the reference's greedy tokens, by label;
    the artifact's greedy tokens are its argmax at those positions (teacher-forced, as verify)."""
    out = {}
    for name, p in index.get("images", {}).get("prompts", {}).items():
        want, got = ref[f"{name}_logits"], test[f"{name}_logits"]
        c = Comparison()
        c.add(want, got)
        out[p["label"]] = {**c.summary(), "views": p["views"], "prompt_tokens": p["tokens"],
                           "greedy_reference": ref[f"{name}_tokens"].tolist(),
                           "greedy_test": np.argmax(got, axis=-1).astype(int).tolist()}
    return out


def _check_stock(outputs_dir: Path, bundle_dir: Path, index: dict) -> Checked:
    """A stock tool's printed text against the reference's greedy text. Recipes judged relative to
    the recipe (the runtime rounds activations its own way) may diverge in greedy text: reported,
    not failed, as `verify` does for their greedy tokens."""
    if "stock" not in index:
        raise ArtifactError(f"{bundle_dir}: this bundle has no stock-tool run; re-write it with gemma-export bundle")
    report, failures = stock.check_stock_output(outputs_dir, index)
    rule = Rule.for_recipe(index["recipe"])
    failed = tuple(failures) if rule.require_greedy else ()
    mode = "stock tool's greedy text against the reference" + ("" if rule.require_greedy else " (reported only)")
    verdict = Verdict(not failed, mode, failed, ({"check": "greedy text found", "value": report["found"]},))
    return Checked({"outputs": str(outputs_dir), "bundle": str(bundle_dir), "format": index["artifact"]["format"],
                    "artifact": index["artifact"]["name"], "reference": index["reference"]["description"],
                    **verdict.to_dict(), "stock": report}, verdict)


# ----------------------------------------------------------------------------------------------
# The device runner script
# ----------------------------------------------------------------------------------------------

_SCRIPT = r"""#!/bin/sh
# run_on_device.sh: golden bundle for the {fmt} artifact {name}. Pushes the artifact and the
# inputs to an adb-connected phone, runs the {fmt} on-device runner there, pulls the outputs back.
#
# Usage:  ./run_on_device.sh ARTIFACT_DIR [OUTPUTS_DIR]
#   ARTIFACT_DIR  the artifact this bundle was made from (its manifest.json sha256 is checked)
#   OUTPUTS_DIR   where the outputs land on this machine [default: outputs/ beside this script]
# Then:   gemma-export verify --outputs OUTPUTS_DIR
#
# Environment:
#   {env}  path, on this machine, of the on-device runner built for the phone:
#                     {hint}
#   ANDROID_SERIAL    which phone, when several are attached (read by adb itself)
#   DEVICE_DIR        working folder on the phone [default: /data/local/tmp/gemma-bundle];
#                     shared libraries the runner needs can be pushed there (LD_LIBRARY_PATH=.)
#   ADB               the adb program [default: adb]
#
# Runner interface. On the phone, in DEVICE_DIR, the runner is started as
#     ./runner bundle --artifact artifact --out outputs
# (the arguments of `gemma-export bundle-run`, the desktop implementation of this interface).
# The artifact's files are in artifact/ under the names its manifest.json lists. The runner
#   reads   bundle/inputs/*.bin, raw little-endian int32 (shapes follow from the file sizes):
#     tokens.bin           [N]     N={n} token ids; teacher forcing feeds tokens[p] at position p
#     calls.bin            [C, 2]  C={c} calls (pos, n), in order, on one cache from an empty start:
#                                  n > 1: prefill tokens[pos:pos+n] (padded with 0 to the static
#                                  prefill length {prefill_len}, length = n); n = 1: decode tokens[pos]
#     ref_topk_indices.bin [N, K]  K={k} vocabulary ids per position at which to report logits
#     full_positions.bin   [F]     positions whose full logits to report
#     prompt.bin           [P]     greedy run on an emptied cache: prefill the prompt in chunks of
#     new_tokens.bin       [1]     {prefill_len} (the last may be shorter); then G = new_tokens tokens: the
#                                  first is the argmax of the prompt's last logits, each next one the
#                                  argmax of decoding the previous token at the next position
#   writes  outputs/*.bin, raw little-endian:
#     topk_values.bin      float32 [N, K]  its K largest logits at each position, descending
#     topk_indices.bin     int32   [N, K]  their vocabulary ids
#     at_reference.bin     float32 [N, K]  its logits at ref_topk_indices
#     full_logits.bin      float32 [F, V]  all V={vocab} logits at each of full_positions
#     greedy_tokens.bin    int32   [G]     the greedy tokens{images}
#   and exits 0.
#
# Exit status: 0 outputs pulled; 2 no adb, no device or no runner; 1 wrong artifact; otherwise
# the status of the failing step.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
FORMAT={fmt}
MANIFEST_SHA256={manifest_sha}
BUNDLE_SHA256={bundle_sha}
ARTIFACT_FILES="{files}"
INPUTS="{inputs}"
OUTPUTS="{outputs}"
ADB=${{ADB:-adb}}
DEVICE_DIR=${{DEVICE_DIR:-/data/local/tmp/gemma-bundle}}
RUNNER=${{{env}:-}}

die() {{ code=$1; shift; echo "run_on_device.sh: $*" >&2; exit "$code"; }}

[ $# -ge 1 ] || die 2 "usage: $0 ARTIFACT_DIR [OUTPUTS_DIR]"
ARTIFACT=$1
OUT=${{2:-$HERE/outputs}}

command -v "$ADB" >/dev/null 2>&1 || die 2 "no device: adb not found (install Android platform-tools or set ADB)"
DEVICES=$("$ADB" devices | awk 'NR > 1 && $2 == "device" {{ print $1 }}')
[ -n "$DEVICES" ] || die 2 "no device attached ('$ADB devices' lists none); connect a phone with USB debugging on"
if [ -z "${{ANDROID_SERIAL:-}}" ] && [ "$(echo "$DEVICES" | wc -l)" -gt 1 ]; then
    die 2 "several devices attached; choose one with ANDROID_SERIAL"
fi
SERIAL=${{ANDROID_SERIAL:-$DEVICES}}
[ -n "$RUNNER" ] || die 2 "set {env} to the on-device $FORMAT runner (see the header of $0)"
[ -f "$RUNNER" ] || die 2 "{env}=$RUNNER: no such file"
[ -f "$ARTIFACT/manifest.json" ] || die 1 "$ARTIFACT: no manifest.json; not an artifact folder"
SHA=$( (sha256sum "$ARTIFACT/manifest.json" 2>/dev/null || shasum -a 256 "$ARTIFACT/manifest.json") | awk '{{ print $1 }}')
[ "$SHA" = "$MANIFEST_SHA256" ] || die 1 "$ARTIFACT: not the artifact this bundle was made from (manifest sha256 differs)"

echo "run_on_device.sh: pushing to $SERIAL:$DEVICE_DIR" >&2
"$ADB" shell "rm -rf '$DEVICE_DIR' && mkdir -p '$DEVICE_DIR/bundle/inputs' '$DEVICE_DIR/artifact' '$DEVICE_DIR/outputs'"
for f in $ARTIFACT_FILES manifest.json; do "$ADB" push "$ARTIFACT/$f" "$DEVICE_DIR/artifact/$f" >&2; done
"$ADB" push "$HERE/index.json" "$DEVICE_DIR/bundle/index.json" >&2
for a in $INPUTS; do "$ADB" push "$HERE/inputs/$a.bin" "$DEVICE_DIR/bundle/inputs/$a.bin" >&2; done
"$ADB" push "$RUNNER" "$DEVICE_DIR/runner" >&2

echo "run_on_device.sh: running the $FORMAT runner on $SERIAL" >&2
status=0
"$ADB" shell "cd '$DEVICE_DIR' && chmod 755 runner && LD_LIBRARY_PATH=. ./runner bundle --artifact artifact --out outputs" || status=$?
[ "$status" -eq 0 ] || die "$status" "the runner failed on $SERIAL (exit $status)"

mkdir -p "$OUT"
for o in $OUTPUTS; do "$ADB" pull "$DEVICE_DIR/outputs/$o.bin" "$OUT/$o.bin" >&2; done
printf '{{"bundle": "%s", "bundle_sha256": "%s", "produced_by": "run_on_device.sh on %s with %s"}}\n' \
    "$HERE" "$BUNDLE_SHA256" "$SERIAL" "$RUNNER" > "$OUT/index.json"
echo "run_on_device.sh: outputs in $OUT; check them with: gemma-export verify --outputs $OUT" >&2
"""


def _image_note(index: dict) -> str:
    """The runner's duties for the image prompts of a bundle that has them."""
    if "images" not in index:
        return ""
    v = index["images"]["vision"]
    lines = ["", "# and, for each image prompt i in " + " ".join(index["images"]["prompts"]) + ", on an emptied cache:",
             "#   reads   image{i}_prompt.bin  int32 [Q]  token ids, each view's image soft tokens (id "
             f"{v['image_token_id']}) in place",
             f"#           image{{i}}_pixels.bin  float32 [views, 3, {v['image_size']}, {v['image_size']}]  each view's "
             "preprocessed pixels, in order",
             "#           image{i}_teacher.bin int32 [G]  tokens to decode after the prompt",
             "#   runs the prompt's text in prefill chunks and each view (a run of image tokens) as one chunk of",
             "#   its vision encoder's embeddings, its tokens seeing each other (the manifest's images block)",
             "#   writes  image{i}_logits.bin  float32 [G + 1, V]  the logits after the prompt and after each",
             "#                                teacher token decoded at the next position"]
    return "\n".join(lines)


def runner_script(index: dict, bundle_sha: str) -> str:
    a = index["artifact"]
    files = sorted(a["files"])
    if any(c in f for f in files for c in " '\"$`\\"):
        raise ConfigError(f"artifact file names with spaces or quotes cannot be pushed by {SCRIPT}: {files}")
    runner = backends.get(a["format"]).runner
    return _SCRIPT.format(
        fmt=a["format"], name=a["name"], env=runner.env, hint=runner.description.replace("\n", "\n#" + " " * 21),
        n=index["positions"], c=len(index["calls"]["sequence"]), k=index["topk"], prefill_len=a["prefill_len"],
        vocab=a["vocab_size"], manifest_sha=a["manifest_sha256"], bundle_sha=bundle_sha, files=" ".join(files),
        inputs=" ".join(index["inputs"]["arrays"]), outputs=" ".join(index["outputs"]),
        images=_image_note(index),
    )
