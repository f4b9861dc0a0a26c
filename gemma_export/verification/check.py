"""What `verify` and `eval` run: one artifact against its reference, a build folder across formats
and recipes (and the formats against each other), and perplexity / KL against fp32.

Library code: returns data, never prints. Verdicts come from the judge.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import backends
from ..artifact import find_artifacts, is_artifact, read_manifest
from ..errors import ArtifactError
from ..gemma3.images import ImageSettings
from ..lint import lint
from ..loading import ModelSpec
from ..progress import Progress, quiet
from ..runtime import Opened, open_artifact, open_model, reference_for
from ..session import TorchSession
from .judge import Rule, Verdict, judge, judge_build
from .parity import (LOCATE_THRESHOLD, ParityResult, image_parity, locate, parity, perplexity_of, schedule_for,
                     teacher_forced)

# the summary keys reported for the comparisons against fp32 in a relative judgement
_FP32_KEYS = ("positions", "top1_agreement", "mean_kl", "perplexity_reference", "perplexity_test")
_SIM_KEYS = ("positions", "top1_agreement", "mean_kl", "max_kl", "min_cosine", "max_abs_diff")


@dataclass(frozen=True)
class VerifyPlan:
    """What to run for each artifact (the options of `verify`)."""

    text: Path
    positions: int = 1300
    new_tokens: int = 32
    prompt: str = "The capital of France is"
    reference: str | None = None  # model to compare with; None: the one the artifact came from
    overrides: dict = field(default_factory=dict)  # Thresholds fields that replace the judge's bounds
    threads: int = 2
    locate: bool = False  # also name the first diverging layer (debug entry point)
    locate_threshold: float | None = None
    # image prompts, for artifacts with image entry points: these files (empty: a bundled photograph
    # from matplotlib's sample data), once as they are and once with pan-and-scan; None: skip
    images: tuple[str, ...] | None = ()


@dataclass
class Verified:
    """One artifact's verification: the JSON-able report plus what the plot and pairwise need."""

    report: dict
    result: ParityResult
    opened: Opened  # the artifact (kept for the pairwise comparison)
    ids: list
    window: int
    verdict: Verdict

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def raise_if_failed(self) -> None:
        self.verdict.raise_if_failed(self.report["artifact"])


class References:
    """Reference sessions loaded once per (model, context, recipe) and shared by every artifact."""

    def __init__(self, plan: VerifyPlan):
        self.plan = plan
        self._loaded = {}

    def session_for(self, manifest, quantized: bool = True) -> Opened:
        recipe = manifest.recipe if quantized and manifest.recipe_name != "fp32" else None
        key = (self.plan.reference or json.dumps(manifest.model.spec, sort_keys=True), manifest.max_context,
               json.dumps(recipe, sort_keys=True))
        if key not in self._loaded:
            self._loaded[key] = reference_for(manifest, quantized, self.plan.reference, self.plan.threads)
        ref = self._loaded[key]
        if ref.session.info.prefill_len != manifest.prefill_len:  # same weights, other chunk size
            return Opened(TorchSession(ref.session.model, prefill_len=manifest.prefill_len), ref.tokenizer,
                          ref.description, vision=ref.vision)
        return ref


def verify_artifact(folder: str | Path, plan: VerifyPlan, refs: References | None = None,
                    progress: Progress = quiet) -> Verified:
    """Teacher-forced + greedy parity of one artifact against its PyTorch reference, judged."""
    manifest = read_manifest(folder)
    progress(f"opening {folder} ({manifest.format}, {manifest.recipe_name}) and checking every file's sha256")
    test = open_artifact(folder, plan.threads, hashes=True)
    lint(folder).raise_if_failed()  # what opening does not check: tokenizer, recipe, entry points
    refs = refs or References(plan)
    progress("loading the PyTorch reference" + (f" ({manifest.recipe_name} applied in PyTorch)"
                                                if manifest.recipe_name != "fp32" else ""))
    ref = refs.session_for(manifest)
    rule = Rule.for_recipe(manifest.recipe, plan.overrides)
    ids = test.tokenizer.encode(Path(plan.text).read_text())[:plan.positions]
    # where the runtime rounds activations its own way, artifact and recipe are judged against fp32
    fp32 = refs.session_for(manifest, quantized=False).session if rule.relative else None
    # an NPU target's recipe without its compiler: a mismatch there is the compiler's, not the recipe's
    backend = backends.get(manifest.format)
    simulated = backend.simulated(folder, manifest, plan.threads) if hasattr(backend, "simulated") else None
    res = parity(ref.session, test.session, ids, test.tokenizer.encode(plan.prompt), plan.new_tokens,
                 test.tokenizer.stop_ids, fp32=fp32, progress=progress, simulated=simulated)
    images = {}
    if manifest.images is not None and plan.images is not None:
        images = _image_parity(manifest, ref, test, plan, progress)
    against = None
    if rule.relative:
        against = {who: {k: v for k, v in res.against_fp32[side].summary().items() if k in _FP32_KEYS}
                   for who, side in (("artifact", "test"), ("recipe_in_pytorch", "reference"))}
        verdict = judge(rule, {"artifact": against["artifact"]}, {"artifact": against["recipe_in_pytorch"]})
    else:
        greedy = {None: (res.greedy_reference, res.greedy_test),
                  **{label: (s["greedy_reference"], s["greedy_test"]) for label, s in images.items()}}
        verdict = judge(rule, {"artifact": res.teacher_forced.summary(), **images}, greedy=greedy)
    report = {"artifact": str(folder), "format": manifest.format, "recipe": manifest.recipe_name,
              "reference": ref.description, "text": str(plan.text), "window": manifest.window,
              "rule": rule.to_dict(), **verdict.to_dict(), **res.summary(),
              "greedy_reference": res.greedy_reference, "greedy_test": res.greedy_test}
    if against is not None:
        report["against_fp32"] = against
    if res.against_simulated is not None:  # reported beside the judged comparison
        report["against_simulated"] = {k: v for k, v in res.against_simulated.summary().items() if k in _SIM_KEYS}
    if "compile" in manifest.program:  # an NPU target's: what ran where, per SoC and graph
        report["compile"] = {"precision": manifest.program.get("precision"), **manifest.program["compile"]}
    if images:
        # a quantized artifact's image prompts are reported against the recipe in PyTorch, not judged
        report["images"] = {**images, "judged": not rule.relative}
    if plan.locate:
        progress("locating the first diverging layer")
        report["locate"] = locate(ref.session, test.session, ids, plan.locate_threshold or LOCATE_THRESHOLD)
        if simulated is not None:  # the same layers against the recipe without the compiler
            report["locate_against_simulated"] = locate(simulated, test.session, ids,
                                                        plan.locate_threshold or LOCATE_THRESHOLD)
    return Verified(report, res, test, ids, manifest.window, verdict)


def image_prompts(manifest, tokenizer, images: tuple, prompt: str, progress: Progress = quiet) -> dict:
    """The labelled image prompts an artifact with images is checked on: `images` (paths) in one
    prompt and again with pan-and-scan; without any, matplotlib's photograph of Grace Hopper, and the
    same widened to 1900x300 so that pan-and-scan crops it (4 crops)."""
    import matplotlib

    from ..gemma3.vision import VisionConfig  # torch
    from ..multimodal import image_prompt

    vc = VisionConfig.from_dict(manifest.images["vision"])
    settings = ImageSettings.from_dict(manifest.images["preprocessing"])
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    files = list(images) or [str(photo)]
    out = {}
    for label, pan in (("image+text", False), ("pan-and-scan", True)):
        shown = files
        if pan and not images:
            from PIL import Image

            shown = [Image.open(photo).convert("RGB").resize((1900, 300))]
        progress(f"image prompt ({label}, {len(shown)} image(s))")
        out[label] = image_prompt(tokenizer, vc, settings.replace(pan_and_scan=pan), prompt, shown, chat=True)
    return out


def _image_parity(manifest, ref: Opened, test: Opened, plan: VerifyPlan, progress: Progress) -> dict:
    """Image prompts through the artifact against its reference, by label."""
    vision = ref.vision() if ref.vision is not None else None
    if vision is None:
        raise ArtifactError(f"the reference {ref.description} has no vision encoder to compare the image entry "
                            "points with")
    return {label: image_parity(ref.session, vision, test.session, p, plan.new_tokens, test.tokenizer.stop_ids).summary()
            for label, p in image_prompts(manifest, test.tokenizer, plan.images, plan.prompt, progress).items()}


@dataclass
class Build:
    """A build folder's verification: a row per artifact, and the formats against each other."""

    folder: str
    rows: list[dict]
    pairwise: list[dict]
    verified: list[Verified]

    @property
    def passed(self) -> bool:
        return all(r["pass"] for r in self.rows)

    def to_dict(self) -> dict:
        return {"build": self.folder, "pass": self.passed, "artifacts": self.rows, "pairwise": self.pairwise}

    def raise_if_failed(self) -> None:
        judge_build(self.rows)


def verify_build(build_dir: str | Path, plan: VerifyPlan, progress: Progress = quiet) -> Build:
    """Verify every artifact under build_dir against its reference, then every pair of artifacts of
    the same model against each other. An artifact that cannot be opened is a row with an error."""
    refs = References(plan)
    rows, done = [], []
    folders = find_artifacts(build_dir)
    for i, folder in enumerate(folders, 1):
        progress(f"artifact {i}/{len(folders)}: {folder}")
        try:
            v = verify_artifact(folder, plan, refs, progress)
        except ArtifactError as e:
            rows.append({"artifact": str(folder), "pass": False, "error": str(e)})
            continue
        rows.append(v.report)
        done.append(v)
    return Build(str(build_dir), rows, pairwise(done, progress), done)


def _model_key(v: Verified) -> str:
    m = v.opened.manifest
    tok = m.files.get(m.tokenizer.file)
    return json.dumps([m.model.spec, m.model.config, tok.sha256 if tok else None], sort_keys=True)


def pairwise(verified: list[Verified], progress: Progress = quiet) -> list[dict]:
    """Teacher-forced comparison of each pair of artifacts of the same model (the first as reference)."""
    out = []
    for a, b in itertools.combinations(verified, 2):
        if _model_key(a) != _model_key(b):
            continue
        progress(f"comparing {a.report['artifact']} with {b.report['artifact']}")
        ia, ib = a.opened.session.info, b.opened.session.info
        ids = a.ids[:min(ia.max_context, ib.max_context)]
        c = teacher_forced(a.opened.session, b.opened.session, ids, schedule_for(min(ia.prefill_len, ib.prefill_len)),
                           progress)
        s = c.summary()
        ra, rb = a.report, b.report
        out.append({"a": ra["artifact"], "b": rb["artifact"],
                    "formats": f"{ra['format']}/{ra['recipe']} vs {rb['format']}/{rb['recipe']}",
                    **{k: s[k] for k in ("positions", "top1_agreement", "top5_overlap", "mean_kl", "max_abs_diff")}})
    return out


# ----------------------------------------------------------------------------------------------
# eval: what the quantization costs against fp32
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPlan:
    text: Path
    positions: int = 2048
    reference: str | None = None  # fp32 model to compare with; None: the model's own source
    with_reference: bool = True  # False: perplexity only
    threads: int = 2


def evaluate(spec: ModelSpec, recipe: str, prefill_len: int, plan: EvalPlan, progress=lambda m: None) -> dict:
    """Perplexity of a model (an artifact folder, or the model `spec` quantized in PyTorch by
    `recipe`) on a text, and its KL / top-1 agreement against the fp32 model it came from."""
    if is_artifact(spec.source):
        test = open_artifact(spec.source, plan.threads)
    else:
        test = open_model(spec, recipe, prefill_len, plan.threads, progress)
    ids = test.tokenizer.encode(Path(plan.text).read_text())[:plan.positions]
    result = {"model": test.description, "text": str(plan.text), "positions": len(ids)}
    if not plan.with_reference:
        progress(f"scoring {len(ids):,} positions")
        return {**result, "perplexity": perplexity_of(test.session, ids, progress)}
    if test.manifest is not None:  # quality is judged against the fp32 model the artifact came from
        ref = reference_for(test.manifest, quantized=False, override=plan.reference, threads=plan.threads)
    else:
        ref_spec = replace(spec, source=plan.reference or spec.source, max_context=test.session.info.max_context)
        ref = open_model(ref_spec, "fp32", prefill_len, plan.threads)
    progress(f"teacher-forcing {len(ids):,} positions through {test.description} and the fp32 reference")
    s = teacher_forced(ref.session, test.session, ids, progress=progress).summary()
    return {**result, "reference": ref.description, "perplexity": s["perplexity_test"],
            "perplexity_reference": s["perplexity_reference"],
            "perplexity_change": s["perplexity_test"] / s["perplexity_reference"] - 1,
            "mean_kl": s["mean_kl"], "top1_agreement": s["top1_agreement"], "top5_overlap": s["top5_overlap"]}
