"""Quantized checkpoints in, the same codes out: real 270M sources exported with the `source` recipe
against re-rounding them (int4-b32-rtn and the calibrated int4-b32), per format.

Sources: the bundled Q4_K_M GGUF, and a Q4_0 GGUF made from it with the gguf package's own
quantizer (every 2-D weight Q4_0: the stand-in for a QAT file). For each artifact: whether the
codes read back from the model file include every source tensor's codes bit for bit; KL, top-1
and perplexity against the source dequantized in fp32 (`gemma-export eval`, held-out text); 32
greedy tokens against that fp32 model; model-file bytes against the GGUF's.

Usage: python -m benchmarks.source [--sources q4_0,q4_k_m] [--recipes source,int4-b32-rtn,int4-b32]
Writes (merges into) benchmarks/results/source-270m.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "out" / "bench" / "source"
PROMPT = "The capital of France is"


def q4_0_gguf() -> Path:
    """The bundled 270M re-quantized to pure Q4_0 by gguf's quantizer (made once, in the cache)."""
    from gemma_export.loading import bundled_gguf
    from gemma_export.paths import cache_dir
    from gemma_export.quant import source

    dst = cache_dir() / "gemma-3-270m-q4_0.gguf"
    if not dst.is_file():
        src = bundled_gguf()
        tmp = dst.with_suffix(".tmp")
        source.write_gguf(src, tmp, source.gguf_tensors(src), lambda name, arr: "Q4_0")
        tmp.replace(dst)
    return dst


def export(model: Path, fmt: str, recipe: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "gemma_export", "export", str(model), "--format", fmt, "--recipe", recipe,
           "--out", str(out), "--force"]
    print(" ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    log = out.with_suffix(".log")
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=f, cwd=ROOT).returncode
    if code:
        sys.exit(f"export failed (exit {code}); see {log}")
    return round(time.perf_counter() - t0, 1)


def model_bytes(folder: Path) -> int:
    from gemma_export.artifact import read_manifest

    m = read_manifest(folder)
    return sum((folder / f).stat().st_size for f in (m.program.get("file"), m.program.get("external_data"),
                                                     m.program.get("data")) if f and (folder / f).is_file())


def codes_kept(folder: Path, fmt: str, model: Path) -> dict:
    """How many source tensors' codes the artifact's model file holds bit for bit: as the source
    stores them, and as the recipe holds them (XNNPACK's 4-bit blocks: signs folded, source.as_stored)."""
    from gemma_export import backends
    from gemma_export.artifact import read_manifest
    from gemma_export.quant import source
    from gemma_export.quant.recipes import resolve

    m = read_manifest(folder)
    recipe = resolve(m.recipe)
    want = source.read_codes(model, [r.pattern for r in recipe.rules if r.scheme and r.scheme.algorithm == "source"])
    stored = {(a.shape, a.tobytes()) for a in backends.get(fmt).read_codes(folder, m)}
    held = {n: source.as_stored(c, recipe.scheme_for(n)) for n, c in want.items()}
    lost = sum(source.values_not_kept(c, recipe.scheme_for(n)) for n, c in want.items())
    return {"source_tensors": len(want),
            "codes_equal_to_source": sum((c.codes.shape, c.codes.tobytes()) in stored for c in want.values()),
            "codes_equal_to_recipe": sum((c.codes.shape, c.codes.tobytes()) in stored for c in held.values()),
            "values_not_kept": lost, "values": sum(c.codes.size for c in want.values())}


def quality(folder: Path, positions: int) -> dict:
    from gemma_export import api
    from gemma_export.verification.check import EvalPlan

    r = api.evaluate(str(folder), plan=EvalPlan(api.DEFAULT_TEXT, positions=positions))
    return {k: r[k] for k in ("perplexity", "perplexity_reference", "perplexity_change", "mean_kl", "top1_agreement")}


def greedy(folder: Path, model: Path, reference: dict) -> dict:
    from gemma_export import api

    if str(model) not in reference:
        reference[str(model)] = api.open(str(model)).generate(PROMPT, 32).tokens
    got = api.open(str(folder)).generate(PROMPT, 32).tokens
    want = reference[str(model)]
    prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return {"greedy_equal": got == want, "greedy_equal_prefix": prefix}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="q4_0,q4_k_m")
    ap.add_argument("--formats", default="onnx,pte,tflite")
    ap.add_argument("--recipes", default="source,int4-b32-rtn",
                    help="add int4-b32 for the calibrated recipe (about 10 minutes of calibration a source)")
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--results", default="source-270m", help="results file name (rows merged by source, format, recipe)")
    args = ap.parse_args()
    from gemma_export import backends
    from gemma_export.errors import ExportError
    from gemma_export.loading import bundled_gguf, read_config
    from gemma_export.quant import source
    from gemma_export.quant.recipes import resolve

    sources = {"q4_0": q4_0_gguf, "q4_k_m": bundled_gguf}
    OUT.mkdir(parents=True, exist_ok=True)
    rows, reference = [], {}
    for name in args.sources.split(","):
        model = sources[name]()
        cfg = read_config(str(model))
        for recipe in args.recipes.split(","):
            groups: dict[str, list[str]] = {}  # recipe -> formats: one export (one calibration) each
            for fmt in args.formats.split(","):
                # XNNPACK's integer kernels take only their own dynamic int8 activations
                chosen = recipe if recipe != "source" or fmt == "onnx" else "source-dynamic"
                try:
                    backends.check_support(fmt, source.resolve_for(resolve(chosen), str(model), cfg))
                except ExportError as e:
                    rows.append({"source": name, "format": fmt, "recipe": chosen, "refused": str(e)})
                    print(f"{name} {fmt} {chosen}: refused: {e}", flush=True)
                    continue
                groups.setdefault(chosen, []).append(fmt)
            for chosen, fmts in groups.items():
                build = OUT / f"{name}-{chosen}"
                seconds = export(model, ",".join(fmts), chosen, build)
                for fmt in fmts:
                    out = build / fmt if len(fmts) > 1 else build
                    row = {"source": name, "gguf_bytes": model.stat().st_size, "format": fmt, "recipe": chosen,
                           "export_seconds_all_formats": seconds, "model_bytes": model_bytes(out)}
                    row["model_over_gguf"] = round(row["model_bytes"] / row["gguf_bytes"], 4)
                    if recipe == "source":
                        row.update(codes_kept(out, fmt, model))
                    row.update(quality(out, args.positions))
                    row.update(greedy(out, model, reference))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                shutil.rmtree(build)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.results}.json"
    keys = ("source", "format", "recipe")
    fresh = {tuple(r[k] for k in keys) for r in rows}
    old = json.loads(path.read_text())["results"] if path.is_file() else []
    rows = [r for r in old if tuple(r.get(k) for k in keys) not in fresh] + rows
    path.write_text(json.dumps({"benchmark": args.results, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "machine": {"platform": platform.platform()}, "positions": args.positions,
                                "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
