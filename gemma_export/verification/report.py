"""How verification results read: the lines `verify` and `verify --outputs` print, the build
table, and the report folder people open (report.md + parity.png + report.json).

Library code: returns text and writes files, never prints. matplotlib is imported only when a
plot is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .check import Build, Verified
from .judge import RELATIVE_KL, RELATIVE_KL_SLACK, RELATIVE_TOP1

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PARITY_PNG = "parity.png"
SHOWN = ("positions", "top1_agreement", "top5_overlap", "mean_kl", "max_kl", "max_abs_diff", "min_cosine",
         "perplexity_reference", "perplexity_test", "greedy_equal_prefix", "greedy_tokens")


def _value_lines(rows) -> list[str]:
    return [f"{k:<22} {v:.6g}" if isinstance(v, float) else f"{k:<22} {v}" for k, v in rows]


def summary_lines(report: dict) -> list[str]:
    """The metric lines `verify` prints for one artifact."""
    out = _value_lines((k, report[k]) for k in SHOWN if k in report)
    for who, s in report.get("against_fp32", {}).items():
        out.append(f"vs fp32, {who.replace('_', ' '):<17} top-1 {s['top1_agreement']:.4f}  mean KL "
                   f"{s['mean_kl']:.4g}  perplexity {s['perplexity_test']:.4g} (fp32 {s['perplexity_reference']:.4g})")
    if "against_fp32" in report:
        out.append(f"judged {report['judged']} (the runtime quantizes activations itself)")
    overridden = [f"{c['metric']} {c['op']} {c['limit']:g}" for c in report.get("checks", []) if c["source"] == "override"]
    if overridden:
        out.append("threshold overrides applied: " + ", ".join(overridden))
    out += image_lines(report)
    if "locate" in report:
        out += locate_lines(report["locate"])
    if "locate_against_simulated" in report:
        out += locate_lines(report["locate_against_simulated"], "against the recipe without the compiler")
    return out


def image_lines(report: dict) -> list[str]:
    """A line per image prompt of a report (verify's or a bundle check's), and whether they were judged."""
    out = []
    images = report.get("images", {})
    for label, s in images.items():
        if isinstance(s, dict):
            same = "equal" if s["greedy_reference"] == s["greedy_test"] else "DIFFER"
            out.append(f"image prompt, {label:<13} {s['views']} view(s), {s['prompt_tokens']} tokens: top-1 "
                       f"{s['top1_agreement']:.4f}  mean KL {s['mean_kl']:.4g}  max |diff| {s['max_abs_diff']:.3g}  "
                       f"greedy {len(s['greedy_test'])} tokens {same}")
    if images and not images.get("judged"):
        out.append("image prompts reported, not judged (a quantized artifact is judged against fp32 on text)")
    return out


def locate_lines(found: dict, against: str = "") -> list[str]:
    lines = [f"per-layer relative error of the hidden state{', ' + against if against else ''} "
             f"({found['tokens']} tokens at position 0):"]
    lines += [f"  {name:<12} {err:.3g}{'  <- diverges' if err > found['threshold'] else ''}"
              for name, err in found["relative_error"].items()]
    first = found["first_diverging"]
    lines.append(f"first diverging: {first} (threshold {found['threshold']:g})" if first
                 else f"no layer diverges beyond {found['threshold']:g}")
    return lines


def outputs_lines(checked: dict) -> list[str]:
    """The metric lines `verify --outputs` prints."""
    if "stock" in checked:  # a stock tool's printed text
        st = checked["stock"]
        return _value_lines([("reference greedy text", repr(st["reference_text"])),
                             ("found in the tool's output", st["found"])]) + [f"judged {checked['judged']}"]
    t, f = checked["topk"], checked["full_logits"]
    rows = [("positions", t["positions"]), ("top1_agreement", t["top1_agreement"]), ("top5_overlap", t["top5_overlap"]),
            (f"mean_kl (top-{t['k']})", t["mean_kl"]), (f"max_abs_diff (top-{t['k']})", t["max_abs_diff"]),
            ("full_logits positions", f["positions"]), ("mean_kl (full)", f["mean_kl"]),
            ("max_abs_diff (full)", f["max_abs_diff"]), ("greedy_equal_prefix", checked["greedy_equal_prefix"]),
            ("greedy_tokens", checked["greedy_tokens"])]
    return _value_lines(rows) + image_lines(checked) + [f"judged {checked['judged']}"]


def build_table(build: Build) -> str:
    """One plain-text table: artifacts against the reference, then the pairwise comparisons."""
    lines = [f"{'artifact':<28} {'format':<7} {'recipe':<8} {'top1':>8} {'top5':>8} {'mean KL':>10} "
             f"{'max|diff|':>10} {'greedy':>7}  result"]
    for r in build.rows:
        name = _short(r["artifact"], build.folder)
        if "error" in r:
            lines.append(f"{name:<28} {'':<7} {'':<8} {'':>8} {'':>8} {'':>10} {'':>10} {'':>7}  ERROR: {r['error']}")
            continue
        greedy = f"{r['greedy_equal_prefix']}/{r['greedy_tokens']}"
        lines.append(f"{name:<28} {r['format']:<7} {r['recipe']:<8} {r['top1_agreement']:>8.4f} "
                     f"{r['top5_overlap']:>8.4f} {r['mean_kl']:>10.3g} {r['max_abs_diff']:>10.3g} {greedy:>7}  "
                     + ("PASS" if r["pass"] else "FAIL: " + "; ".join(r["failures"])))
    if build.pairwise:
        lines += ["", f"{'formats compared with each other':<45} {'top1':>8} {'top5':>8} {'mean KL':>10} "
                  f"{'max|diff|':>10}"]
        for p in build.pairwise:
            pair = f"{_short(p['a'], build.folder)} vs {_short(p['b'], build.folder)}"
            lines.append(f"{pair:<45} {p['top1_agreement']:>8.4f} {p['top5_overlap']:>8.4f} "
                         f"{p['mean_kl']:>10.3g} {p['max_abs_diff']:>10.3g}")
    return "\n".join(lines)


def _short(path: str, root: str) -> str:
    try:
        rel = str(Path(path).relative_to(root))
    except ValueError:
        return path
    return rel if rel != "." else Path(path).name


# ----------------------------------------------------------------------------------------------
# The report folder: report.md + parity.png + report.json
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
    """report.md: the verdict, how it was judged, the metrics, both sides of the window, greedy."""
    r = report
    verdict = "PASS" if r["pass"] else "FAIL"
    md = [f"# Parity report: {r['format']} artifact `{r['artifact']}`", "",
          f"**{verdict}**" + ("" if r["pass"] else ": " + "; ".join(r["failures"])), "",
          "| | |", "|---|---|",
          f"| Artifact | `{r['artifact']}` |", f"| Format | {r['format']} |", f"| Recipe | {r.get('recipe', 'fp32')} |",
          f"| Reference | {r['reference']} |", f"| Text | `{r['text']}` ({r['positions']} positions teacher-forced) |",
          f"| Sliding window | {r['window']} |", ""]
    md += (_against_fp32(r) + _bounds(r) + _metrics(r, per_position) + _npu(r) + _greedy(r, tokenizer)
           + _located(r))
    md += ["", f"![per-position KL and running top-1 agreement]({PARITY_PNG})", ""]
    return "\n".join(md)


def _against_fp32(r: dict) -> list[str]:
    if "against_fp32" not in r:
        return []
    a, b = r["against_fp32"]["artifact"], r["against_fp32"]["recipe_in_pytorch"]
    return ["## Judged against fp32", "",
            "The runtime quantizes activations itself, so the artifact is compared with the fp32 model, "
            f"relative to the recipe in PyTorch: mean KL at most {RELATIVE_KL}x the recipe's (or "
            f"+{RELATIVE_KL_SLACK:g}), top-1 agreement at most {RELATIVE_TOP1:g} (or one standard error of the "
            "recipe's agreement over these positions, if larger) below it. The metrics "
            "further down compare the artifact with the recipe in PyTorch (for information).", "",
            "| vs fp32 | artifact | recipe in PyTorch |", "|---|---|---|",
            f"| top-1 agreement | {a['top1_agreement']:.4f} | {b['top1_agreement']:.4f} |",
            f"| mean KL | {a['mean_kl']:.4g} | {b['mean_kl']:.4g} |",
            f"| perplexity (fp32 {a['perplexity_reference']:.4g}) | {a['perplexity_test']:.4g} | "
            f"{b['perplexity_test']:.4g} |", ""]


def _bounds(r: dict) -> list[str]:
    md = ["## Bounds", "", f"Judged {r['judged']}.", "", "| metric | limit | measured | from | ok |",
          "|---|---|---|---|---|"]
    md += [f"| {c['metric']} {c['op']} | {c['limit']:.6g} | {c['measured']:.6g} | {c['source']} | "
           f"{'yes' if c['ok'] else '**no**'} |" for c in r["checks"]]
    if r["rule"]["relative"]:
        md.append(f"| greedy tokens equal | (not judged) | {r['greedy_equal_prefix']} of {r['greedy_tokens']} | | |")
    else:
        md.append(f"| greedy tokens equal | all {r['greedy_tokens']} | {r['greedy_equal_prefix']} | recipe | "
                  f"{'yes' if r['greedy_equal'] else '**no**'} |")
    return md


def _metrics(r: dict, per_position: dict) -> list[str]:
    md = ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    md += [f"| {key} | {r[key]:.6g} |" if isinstance(r[key], float) else f"| {key} | {r[key]} |"
           for key in SHOWN if key in r and not key.startswith("greedy")]
    md += ["", f"## Per position, before and after the window boundary ({r['window']})", "",
           "| positions | | count | top-1 | top-5 | mean KL | max KL | max abs diff | min cosine |",
           "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {s['range']} | {s['label']} | {s['positions']} | {s['top1_agreement']:.4f} | "
           f"{s['top5_overlap']:.4f} | {s['mean_kl']:.3g} | {s['max_kl']:.3g} | {s['max_abs_diff']:.3g} | "
           f"{s['min_cosine']:.6f} |" for s in window_split(per_position, r["window"])]
    misses = [i for i, t in enumerate(per_position["top1"]) if t < 1.0]
    if misses:
        md += ["", f"Top-1 disagrees at {len(misses)} positions; first: {', '.join(map(str, misses[:10]))}."]
    return md


def _greedy(r: dict, tokenizer) -> list[str]:
    md = ["", "## Greedy generation", "",
          f"{r['greedy_tokens']} tokens; the first {r['greedy_equal_prefix']} agree"
          + (" (all)." if r["greedy_equal"] else "."), "",
          "| | token ids |", "|---|---|",
          f"| reference | {' '.join(map(str, r['greedy_reference']))} |",
          f"| {r['format']} | {' '.join(map(str, r['greedy_test']))} |"]
    if tokenizer is not None:
        md += ["", f"- reference: `{_text(tokenizer, r['greedy_reference'])}`",
               f"- {r['format']}: `{_text(tokenizer, r['greedy_test'])}`"]
    return md


def _npu(r: dict) -> list[str]:
    """An NPU artifact's compile report, and the same recipe without the compiler."""
    md = []
    if "against_simulated" in r:
        a = r["against_simulated"]
        md += ["## Against the recipe without the compiler", "",
               "The artifact's own graphs before compiling, run on the CPU, against the compiled ones: a "
               "difference here is the NPU compiler's or the NPU's arithmetic, not the recipe's.", "",
               f"top-1 agreement {a['top1_agreement']:.4f}, mean KL {a['mean_kl']:.4g}, max KL {a['max_kl']:.4g}, "
               f"min cosine {a['min_cosine']:.4f} over {a['positions']} positions.", ""]
    if "compile" in r:
        c = r["compile"]
        md += ["## Compiled for the NPU", "", f"Precision {c.get('precision')}.", "",
               "| SoC | graph | nodes | on the NPU | context binary | compile time | process peak RSS |",
               "|---|---|---:|---:|---:|---:|---:|"]
        for chip, graphs in c["socs"].items():
            for g, x in graphs.items():
                rss = f"{x['process_peak_rss_mib']:,} MiB" if "process_peak_rss_mib" in x else "(not recorded)"
                md.append(f"| {chip} | {g} | {x['nodes']:,} | {x['nodes_on_npu']:,} | "
                          f"{x['binary_bytes'] / 2**20:,.1f} MiB | {x['seconds']:.1f} s | {rss} |")
        md.append("")
    return md


def _located(r: dict) -> list[str]:
    if "locate" not in r:
        return []
    loc, sim = r["locate"], r.get("locate_against_simulated")
    md = ["", "## Where it diverges (hidden state per layer)", "",
          f"First diverging: **{loc['first_diverging'] or 'none'}** (relative error threshold "
          f"{loc['threshold']:g}, {loc['tokens']} tokens at position 0)."]
    if sim is None:
        return md + ["", "| after | relative error |", "|---|---|",
                     *[f"| {name} | {err:.3g} |" for name, err in loc["relative_error"].items()]]
    md += [f"Against the recipe without the compiler: **{sim['first_diverging'] or 'none'}**; a layer whose "
           "error jumps in the last column is where the compiled graph departs from its own recipe.", "",
           "| after | relative error vs reference | vs the recipe without the compiler |", "|---|---|---|"]
    return md + [f"| {name} | {err:.3g} | {sim['relative_error'][name]:.3g} |" for name, err in loc["relative_error"].items()]


def _text(tokenizer, ids) -> str:
    return json.dumps(tokenizer.decode(ids), ensure_ascii=False)[1:-1].replace("`", "'")


def plot(path: str | Path, per_position: dict, window: int, title: str, limits: dict | None = None) -> Path:
    """Per-position KL (log scale) and running top-1 agreement, the window boundary marked.
    `limits` ({"mean_kl": ..., "top1_agreement": ...}) draws the judge's bounds on the comparison shown."""
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
    limits = limits or {}
    if "mean_kl" in limits:
        ax1.axhline(limits["mean_kl"], color="tab:red", ls=":", lw=1, label=f"max mean KL {limits['mean_kl']:g}")
    ax1.set_ylabel("KL divergence (nats, log)")
    ax1.set_title(title)
    running = np.cumsum(top1) / (x + 1)
    ax2.plot(x, running, color="tab:green", lw=1.2, label="running top-1 agreement")
    miss = top1 < 1
    if miss.any():
        ax2.scatter(x[miss], running[miss], s=10, color="tab:red", label="top-1 disagrees", zorder=3)
    if "top1_agreement" in limits:
        ax2.axhline(limits["top1_agreement"], color="tab:red", ls=":", lw=1,
                    label=f"min top-1 {limits['top1_agreement']:g}")
    lo = min(running.min(), limits.get("top1_agreement", 1.0))
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
    """DIR/report.md, DIR/parity.png and DIR/report.json for one verified artifact."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    r = verified.report
    (folder / REPORT_JSON).write_text(json.dumps(r, indent=2))
    per_position = verified.result.teacher_forced.per_position()
    md = folder / REPORT_MD
    md.write_text(markdown(r, per_position, verified.opened.tokenizer))
    # the bounds are drawn only where they apply to the comparison plotted (artifact vs reference)
    limits = {} if r["rule"]["relative"] else {c["metric"]: c["limit"] for c in r["checks"]}
    png = plot(folder / PARITY_PNG, per_position, verified.window,
               f"{r['format']} artifact {Path(r['artifact']).name} vs {r['reference']}", limits)
    return [folder / REPORT_JSON, md, png]


def write_build_report(folder: str | Path, build: Build) -> list[Path]:
    """DIR/report.md and DIR/report.json with the build table, and one report folder per artifact beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    links = []
    for v in build.verified:
        sub = _short(v.report["artifact"], build.folder).replace("/", "__")
        written += write_report(folder / sub, v)
        links.append(f"- [{sub}]({sub}/{REPORT_MD}): {'PASS' if v.passed else 'FAIL'}")
    (folder / REPORT_JSON).write_text(json.dumps(build.to_dict(), indent=2))
    md = folder / REPORT_MD
    verdict = "PASS" if build.passed else "FAIL"
    md.write_text("\n".join([f"# Parity of every artifact in `{build.folder}`", "", f"**{verdict}**", "",
                             "```", build_table(build), "```", "", *links, ""]))
    return [folder / REPORT_JSON, md, *written]
