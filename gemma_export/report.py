"""What `verify` reports: one artifact against its reference, a build folder across formats and
recipes (and the formats against each other), and the report folder people read (Markdown + PNG).

Library code: returns data and writes files, never prints. matplotlib is imported only when a
plot is drawn.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArtifactError, ConfigError
from .metrics import Thresholds
from .package import MANIFEST, read_manifest

REPORT_MD = "report.md"
PARITY_PNG = "parity.png"

# threshold field -> (summary key, comparison) for the thresholds table
CHECKS = {
    "min_top1": ("top1_agreement", ">="),
    "min_top5": ("top5_overlap", ">="),
    "max_mean_kl": ("mean_kl", "<="),
    "max_abs_diff": ("max_abs_diff", "<="),
    "min_cosine": ("min_cosine", ">="),
}
SHOWN = ("positions", "top1_agreement", "top5_overlap", "mean_kl", "max_kl", "max_abs_diff", "min_cosine",
         "perplexity_reference", "perplexity_test", "greedy_equal_prefix", "greedy_tokens")


@dataclass(frozen=True)
class VerifyPlan:
    """What to run for each artifact (the CLI options of `verify`)."""

    text: Path
    positions: int = 1300
    new_tokens: int = 32
    prompt: str = "The capital of France is"
    reference: str | None = None  # model to compare with; None: the one the artifact came from
    overrides: dict = field(default_factory=dict)  # Thresholds fields that replace the recipe's
    threads: int = 2
    locate: bool = False  # also name the first diverging layer (debug entry point)
    locate_threshold: float | None = None


@dataclass
class Verified:
    """One artifact's verification: the JSON-able report plus what the plot and pairwise need."""

    report: dict
    result: object  # verify.ParityResult
    opened: object  # api.Opened of the artifact (kept for the pairwise comparison)
    ids: list
    window: int

    @property
    def passed(self) -> bool:
        return self.report["pass"]


class References:
    """Reference sessions loaded once per model and shared by every artifact of that model."""

    def __init__(self, plan: VerifyPlan):
        self.plan = plan
        self._loaded = {}

    def session_for(self, manifest: dict):
        from .api import Opened
        from .session import TorchSession
        from .verify import reference_for

        spec = manifest["model"].get("spec") or {}
        key = (self.plan.reference or json.dumps(spec, sort_keys=True), manifest["max_context"],
               json.dumps(manifest.get("recipe"), sort_keys=True))
        if key not in self._loaded:
            self._loaded[key] = reference_for(manifest, self.plan.reference, self.plan.threads)
        ref = self._loaded[key]
        if ref.session.info.prefill_len != manifest["prefill_len"]:  # same weights, other chunk size
            return Opened(TorchSession(ref.session.model, prefill_len=manifest["prefill_len"]),
                          ref.tokenizer, ref.description)
        return ref


def thresholds(manifest: dict, overrides: dict) -> Thresholds:
    from .verify import thresholds_for

    return dataclasses.replace(thresholds_for(manifest), **overrides)


def verify_artifact(folder: str | Path, plan: VerifyPlan, refs: References | None = None) -> Verified:
    """Teacher-forced + greedy parity of one artifact against its PyTorch reference."""
    from .package import open_artifact
    from .verify import parity, relative_failures, runtime_rounds_activations

    manifest = read_manifest(folder)
    test = open_artifact(folder, plan.threads, hashes=True)
    refs = refs or References(plan)
    ref = refs.session_for(manifest)
    th = thresholds(manifest, plan.overrides)
    ids = test.tokenizer.encode(Path(plan.text).read_text())[:plan.positions]
    # the runtime rounds activations its own way: judge artifact and recipe against fp32 instead
    relative = runtime_rounds_activations(manifest.get("recipe"))
    fp32 = refs.session_for({**manifest, "recipe": None}).session if relative else None
    res = parity(ref.session, test.session, ids, test.tokenizer.encode(plan.prompt), plan.new_tokens,
                 test.tokenizer.stop_ids, fp32=fp32)
    failures = res.failures(th)
    if relative:
        keys = ("top1_agreement", "mean_kl", "perplexity_reference", "perplexity_test")
        relative = {who: {k: v for k, v in res.against_fp32[side].summary().items() if k in keys}
                    for who, side in (("artifact", "test"), ("recipe_in_pytorch", "reference"))}
        failures = relative_failures(relative["artifact"], relative["recipe_in_pytorch"])
    report = {"artifact": str(folder), "format": manifest["format"],
              "recipe": manifest.get("request", {}).get("recipe", "fp32"), "reference": ref.description,
              "text": str(plan.text), "window": manifest["window"], "thresholds": th.to_dict(),
              "judged": "against fp32, relative to the recipe in PyTorch" if relative else "against the reference",
              "pass": not failures, "failures": failures, **res.summary(),
              "greedy_reference": res.greedy_reference, "greedy_test": res.greedy_test}
    if relative:
        report["against_fp32"] = relative
    if plan.locate:
        from .verify import LOCATE_THRESHOLD, locate

        report["locate"] = locate(ref.session, test.session, ids, plan.locate_threshold or LOCATE_THRESHOLD)
    return Verified(report, res, test, ids, manifest["window"])


def locate_lines(found: dict) -> list[str]:
    lines = [f"per-layer relative error of the hidden state ({found['tokens']} tokens at position 0):"]
    lines += [f"  {name:<12} {err:.3g}{'  <- diverges' if err > found['threshold'] else ''}"
              for name, err in found["relative_error"].items()]
    first = found["first_diverging"]
    lines.append(f"first diverging: {first} (threshold {found['threshold']:g})" if first
                 else f"no layer diverges beyond {found['threshold']:g}")
    return lines


def summary_lines(report: dict) -> list[str]:
    """The metric lines `verify` prints."""
    out = []
    for key in SHOWN:
        if key in report:
            v = report[key]
            out.append(f"{key:<22} {v:.6g}" if isinstance(v, float) else f"{key:<22} {v}")
    for who, s in report.get("against_fp32", {}).items():
        out.append(f"vs fp32, {who.replace('_', ' '):<17} top-1 {s['top1_agreement']:.4f}  mean KL "
                   f"{s['mean_kl']:.4g}  perplexity {s['perplexity_test']:.4g} (fp32 {s['perplexity_reference']:.4g})")
    if "against_fp32" in report:
        out.append(f"judged {report['judged']} (the runtime quantizes activations itself)")
    return out


# ----------------------------------------------------------------------------------------------
# A build folder: every artifact, one table, and the formats against each other
# ----------------------------------------------------------------------------------------------


def find_artifacts(build_dir: str | Path) -> list[Path]:
    """Artifact folders (holding manifest.json) under build_dir; staging and hidden folders skipped."""
    build_dir = Path(build_dir)
    found = sorted(p.parent for p in build_dir.rglob(MANIFEST)
                   if not any(part.startswith(".") for part in p.parent.relative_to(build_dir).parts))
    if not found:
        raise ArtifactError(f"{build_dir}: no artifact folders (subfolders with {MANIFEST})")
    return found


def verify_build(build_dir: str | Path, plan: VerifyPlan) -> dict:
    """Verify every artifact under build_dir against its reference, then every pair of artifacts of
    the same model against each other. An artifact that cannot be opened is a row with an error."""
    refs = References(plan)
    rows, done = [], []
    for folder in find_artifacts(build_dir):
        try:
            v = verify_artifact(folder, plan, refs)
        except ArtifactError as e:
            rows.append({"artifact": str(folder), "pass": False, "error": str(e)})
            continue
        rows.append(v.report)
        done.append(v)
    return {"build": str(build_dir), "pass": all(r["pass"] for r in rows), "artifacts": rows,
            "pairwise": pairwise(done), "_verified": done}


def _model_key(v: Verified) -> str:
    m = read_manifest(v.report["artifact"])
    tok = m["files"].get(m["tokenizer"]["file"], {}).get("sha256")
    return json.dumps([m["model"].get("spec"), m["model"]["config"], tok], sort_keys=True)


def pairwise(verified: list[Verified]) -> list[dict]:
    """Teacher-forced comparison of each pair of artifacts of the same model (the first as reference)."""
    from .verify import schedule_for, teacher_forced

    out = []
    for a, b in itertools.combinations(verified, 2):
        if _model_key(a) != _model_key(b):
            continue
        ia, ib = a.opened.session.info, b.opened.session.info
        ids = a.ids[:min(ia.max_context, ib.max_context)]
        c = teacher_forced(a.opened.session, b.opened.session, ids, schedule_for(min(ia.prefill_len, ib.prefill_len)))
        s = c.summary()
        ra, rb = a.report, b.report
        out.append({"a": ra["artifact"], "b": rb["artifact"],
                    "formats": f"{ra['format']}/{ra['recipe']} vs {rb['format']}/{rb['recipe']}",
                    **{k: s[k] for k in ("positions", "top1_agreement", "top5_overlap", "mean_kl", "max_abs_diff")}})
    return out


def build_table(build: dict) -> str:
    """One plain-text table: artifacts against the reference, then the pairwise comparisons."""
    lines = [f"{'artifact':<28} {'format':<7} {'recipe':<8} {'top1':>8} {'top5':>8} {'mean KL':>10} "
             f"{'max|diff|':>10} {'greedy':>7}  result"]
    for r in build["artifacts"]:
        name = _short(r["artifact"], build["build"])
        if "error" in r:
            lines.append(f"{name:<28} {'':<7} {'':<8} {'':>8} {'':>8} {'':>10} {'':>10} {'':>7}  ERROR: {r['error']}")
            continue
        greedy = f"{r['greedy_equal_prefix']}/{r['greedy_tokens']}"
        lines.append(f"{name:<28} {r['format']:<7} {r['recipe']:<8} {r['top1_agreement']:>8.4f} "
                     f"{r['top5_overlap']:>8.4f} {r['mean_kl']:>10.3g} {r['max_abs_diff']:>10.3g} {greedy:>7}  "
                     + ("PASS" if r["pass"] else "FAIL: " + "; ".join(r["failures"])))
    if build["pairwise"]:
        lines += ["", f"{'formats compared with each other':<45} {'top1':>8} {'top5':>8} {'mean KL':>10} "
                  f"{'max|diff|':>10}"]
        for p in build["pairwise"]:
            pair = f"{_short(p['a'], build['build'])} vs {_short(p['b'], build['build'])}"
            lines.append(f"{pair:<45} {p['top1_agreement']:>8.4f} {p['top5_overlap']:>8.4f} "
                         f"{p['mean_kl']:>10.3g} {p['max_abs_diff']:>10.3g}")
    return "\n".join(lines)


def _short(path: str, root: str) -> str:
    try:
        rel = str(Path(path).relative_to(root))
    except ValueError:
        return path
    return rel if rel != "." else Path(path).name


def build_json(build: dict) -> dict:
    return {k: v for k, v in build.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------
# The report folder: report.md + parity.png
# ----------------------------------------------------------------------------------------------


def window_split(per_position: dict, window: int) -> list[dict]:
    """Per-position stats before and after the sliding-window boundary."""
    n = len(per_position["kl"])
    out = []
    for label, lo, hi in (("inside the window", 0, min(window, n)), ("past the window", window, n)):
        if hi <= lo:
            continue
        sl = slice(lo, hi)
        out.append({
            "range": f"{lo}..{hi - 1}", "label": label, "positions": hi - lo,
            "top1_agreement": float(np.mean(per_position["top1"][sl])),
            "top5_overlap": float(np.mean(per_position["top5"][sl])),
            "mean_kl": float(np.mean(per_position["kl"][sl])), "max_kl": float(np.max(per_position["kl"][sl])),
            "max_abs_diff": float(np.max(per_position["max_abs"][sl])),
            "min_cosine": float(np.min(per_position["cosine"][sl])),
        })
    return out


def markdown(report: dict, per_position: dict, tokenizer=None) -> str:
    r = report
    verdict = "PASS" if r["pass"] else "FAIL"
    md = [f"# Parity report: {r['format']} artifact `{r['artifact']}`", "",
          f"**{verdict}**" + ("" if r["pass"] else ": " + "; ".join(r["failures"])), "",
          "| | |", "|---|---|",
          f"| Artifact | `{r['artifact']}` |", f"| Format | {r['format']} |", f"| Recipe | {r.get('recipe', 'fp32')} |",
          f"| Reference | {r['reference']} |", f"| Text | `{r['text']}` ({r['positions']} positions teacher-forced) |",
          f"| Sliding window | {r['window']} |", ""]
    if "against_fp32" in r:
        from .verify import RELATIVE_KL, RELATIVE_KL_SLACK, RELATIVE_TOP1

        a, b = r["against_fp32"]["artifact"], r["against_fp32"]["recipe_in_pytorch"]
        md += ["## Judged against fp32", "",
               "The runtime quantizes activations itself, so the artifact is compared with the fp32 model, "
               f"relative to the recipe in PyTorch: mean KL at most {RELATIVE_KL}x the recipe's (or "
               f"+{RELATIVE_KL_SLACK:g}), top-1 agreement at most {RELATIVE_TOP1:g} below it. The metrics "
               "further down compare the artifact with the recipe in PyTorch (for information).", "",
               "| vs fp32 | artifact | recipe in PyTorch |", "|---|---|---|",
               f"| top-1 agreement | {a['top1_agreement']:.4f} | {b['top1_agreement']:.4f} |",
               f"| mean KL | {a['mean_kl']:.4g} | {b['mean_kl']:.4g} |",
               f"| perplexity (fp32 {a['perplexity_reference']:.4g}) | {a['perplexity_test']:.4g} | "
               f"{b['perplexity_test']:.4g} |"]
    else:
        md += ["## Thresholds", "", "| threshold | limit | measured | ok |", "|---|---|---|---|"]
        for name, limit in r["thresholds"].items():
            if limit is None:
                continue
            key, op = CHECKS[name]
            v = r[key]
            ok = v >= limit if op == ">=" else v <= limit
            md.append(f"| {key} {op} | {limit:g} | {v:.6g} | {'yes' if ok else '**no**'} |")
        md.append(f"| greedy tokens equal | all {r['greedy_tokens']} | {r['greedy_equal_prefix']} | "
                  f"{'yes' if r['greedy_equal'] else '**no**'} |")
    md += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    for key in SHOWN:
        if key in r and not key.startswith("greedy"):
            md.append(f"| {key} | {r[key]:.6g} |" if isinstance(r[key], float) else f"| {key} | {r[key]} |")
    md += ["", f"## Per position, before and after the window boundary ({r['window']})", "",
           "| positions | | count | top-1 | top-5 | mean KL | max KL | max abs diff | min cosine |",
           "|---|---|---|---|---|---|---|---|---|"]
    for s in window_split(per_position, r["window"]):
        md.append(f"| {s['range']} | {s['label']} | {s['positions']} | {s['top1_agreement']:.4f} | "
                  f"{s['top5_overlap']:.4f} | {s['mean_kl']:.3g} | {s['max_kl']:.3g} | {s['max_abs_diff']:.3g} | "
                  f"{s['min_cosine']:.6f} |")
    misses = [i for i, t in enumerate(per_position["top1"]) if t < 1.0]
    if misses:
        md += ["", f"Top-1 disagrees at {len(misses)} positions; first: {', '.join(map(str, misses[:10]))}."]
    md += ["", "## Greedy generation", "",
           f"{r['greedy_tokens']} tokens; the first {r['greedy_equal_prefix']} agree"
           + (" (all)." if r["greedy_equal"] else "."), "",
           "| | token ids |", "|---|---|",
           f"| reference | {' '.join(map(str, r['greedy_reference']))} |",
           f"| {r['format']} | {' '.join(map(str, r['greedy_test']))} |"]
    if tokenizer is not None:
        md += ["", f"- reference: `{_text(tokenizer, r['greedy_reference'])}`",
               f"- {r['format']}: `{_text(tokenizer, r['greedy_test'])}`"]
    if "locate" in r:
        loc = r["locate"]
        md += ["", "## Where it diverges (hidden state per layer)", "",
               f"First diverging: **{loc['first_diverging'] or 'none'}** (relative error threshold "
               f"{loc['threshold']:g}, {loc['tokens']} tokens at position 0).", "",
               "| after | relative error |", "|---|---|"]
        md += [f"| {name} | {err:.3g} |" for name, err in loc["relative_error"].items()]
    md += ["", f"![per-position KL and running top-1 agreement]({PARITY_PNG})", ""]
    return "\n".join(md)


def _text(tokenizer, ids) -> str:
    return json.dumps(tokenizer.decode(ids), ensure_ascii=False)[1:-1].replace("`", "'")


def plot(path: str | Path, per_position: dict, window: int, title: str, th: Thresholds | None = None) -> Path:
    """Per-position KL (log scale) and running top-1 agreement, the window boundary marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = np.asarray(per_position["kl"], dtype=np.float64)
    top1 = np.asarray(per_position["top1"], dtype=np.float64)
    if not len(kl):
        raise ConfigError("nothing to plot: no positions compared")
    x = np.arange(len(kl))
    positive = kl[kl > 0]
    floor = positive.min() / 10 if len(positive) else 1e-20
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5), constrained_layout=True)
    ax1.semilogy(x, np.maximum(kl, floor), lw=0.9, color="tab:blue", label="KL(reference || artifact)")
    if (kl <= 0).any():
        ax1.scatter(x[kl <= 0], np.full((kl <= 0).sum(), floor), s=6, color="tab:gray",
                    label=f"KL = 0 (drawn at {floor:.0e})", zorder=3)
    if th is not None and th.max_mean_kl is not None:
        ax1.axhline(th.max_mean_kl, color="tab:red", ls=":", lw=1, label=f"max mean KL {th.max_mean_kl:g}")
    ax1.set_ylabel("KL divergence (nats, log)")
    ax1.set_title(title)
    running = np.cumsum(top1) / (x + 1)
    ax2.plot(x, running, color="tab:green", lw=1.2, label="running top-1 agreement")
    miss = top1 < 1
    if miss.any():
        ax2.scatter(x[miss], running[miss], s=10, color="tab:red", label="top-1 disagrees", zorder=3)
    if th is not None and th.min_top1 is not None:
        ax2.axhline(th.min_top1, color="tab:red", ls=":", lw=1, label=f"min top-1 {th.min_top1:g}")
    lo = min(running.min(), th.min_top1 if th is not None and th.min_top1 is not None else 1.0)
    ax2.set_ylim(max(0.0, lo - 0.05 * max(1 - lo, 0.02)), 1.0 + 0.05 * max(1 - lo, 0.02))
    ax2.set_ylabel("top-1 agreement (running)")
    ax2.set_xlabel("position")
    for ax in (ax1, ax2):
        if window < len(kl):
            ax.axvline(window, color="black", ls="--", lw=1, label=f"sliding window ({window})")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(folder: str | Path, verified: Verified) -> list[Path]:
    """DIR/report.md and DIR/parity.png for one verified artifact."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    r = verified.report
    per_position = verified.result.teacher_forced.per_position()
    md = folder / REPORT_MD
    md.write_text(markdown(r, per_position, verified.opened.tokenizer))
    png = plot(folder / PARITY_PNG, per_position, verified.window,
               f"{r['format']} artifact {Path(r['artifact']).name} vs {r['reference']}",
               Thresholds.from_dict(r["thresholds"]))
    return [md, png]


def write_build_report(folder: str | Path, build: dict) -> list[Path]:
    """DIR/report.md with the build table, and one report folder per artifact beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    links = []
    for v in build["_verified"]:
        sub = _short(v.report["artifact"], build["build"]).replace("/", "__")
        written += write_report(folder / sub, v)
        links.append(f"- [{sub}]({sub}/{REPORT_MD}): {'PASS' if v.passed else 'FAIL'}")
    md = folder / REPORT_MD
    verdict = "PASS" if build["pass"] else "FAIL"
    md.write_text("\n".join([f"# Parity of every artifact in `{build['build']}`", "", f"**{verdict}**", "",
                             "```", build_table(build), "```", "", *links, ""]))
    return [md, *written]
