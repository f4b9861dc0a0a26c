"""Decode speed against position: does a step's cost follow the conversation or the context?

Exports the real 270M at a 32K context (`--no-debug-outputs`) per format, then in one sequence
per artifact prefills random ids up to each checkpoint position (128, 1K, 4K, 16K) and greedy-
decodes `--tokens` tokens there, timing each decode step; the row holds the median decode tok/s
per position and its ratio to the first position's. Each artifact is measured in its own process
(its peak RSS is its own), one after another.

  python -m benchmarks.context [--formats onnx,tflite,pte] [--recipe int4-b32-rtn]
                               [--artifact DIR --label NAME]...   # also measure an existing artifact
                               [--reuse]                          # keep artifacts already exported
                               [--kv-dtypes fp32,int8]            # each format with each cache dtype

`--artifact` measures a folder exported elsewhere (for instance by an earlier commit, to compare
designs in the same run on the same machine); its label names it in the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .run import GE, OUT, run_measured, tag, write

POSITIONS = (128, 1024, 4096, 16384)
CONTEXT = 32768


def measure(folder: Path, positions, tokens: int, threads: int) -> dict:
    """Run in the measuring subprocess: decode tok/s at each position of one growing sequence."""
    import numpy as np

    from gemma_export.runtime import open_artifact

    s = open_artifact(folder, threads).session
    ids = np.random.default_rng(0).integers(10, 200_000, size=max(positions)).tolist()
    s.reset()
    s.prefill_last(ids[: s.info.prefill_len], 0)  # warm-up
    s.reset()
    pos, rows = 0, []
    for target in positions:
        t0 = time.perf_counter()
        while pos < target:  # prefill up to the checkpoint, in the artifact's chunks
            chunk = ids[pos:min(target, pos + s.info.prefill_len)]
            logits = s.prefill_last(chunk, pos)
            pos += len(chunk)
        prefill_s = time.perf_counter() - t0
        tok, steps = int(np.argmax(logits)), []
        for _ in range(tokens):
            t1 = time.perf_counter()
            logits = s.decode(tok, pos)
            steps.append(time.perf_counter() - t1)
            tok = int(np.argmax(logits))
            pos += 1
        rows.append({"position": target, "decode_tok_s": round(1 / float(np.median(steps)), 1),
                     "decode_ms_p90": round(1000 * float(np.percentile(steps, 90)), 2),
                     "prefill_s_to_here": round(prefill_s, 1)})
    return {"max_context": s.info.max_context, "prefill_len": s.info.prefill_len, "positions": rows}


def bench(formats, recipe: str, artifacts: list[tuple[str, str]], tokens: int, threads: int, reuse: bool,
          kv_dtypes=("fp32",)) -> list[dict]:
    todo = []
    for fmt in formats:
        for kv in kv_dtypes:
            label = fmt if kv == "fp32" else f"{fmt}-kv-{kv}"
            out = OUT / f"context-270m-{fmt}-{tag(recipe)}{'' if kv == 'fp32' else f'-kv-{kv}'}"
            if not (reuse and (out / "manifest.json").is_file()):
                cmd = [*GE, "export", "gemma3-270m", "--format", fmt, "--out", str(out), "--force", "--recipe", recipe,
                       "--max-context", str(CONTEXT), "--no-debug-outputs", "--kv-dtype", kv]
                print(f"export 270m {label} {tag(recipe)} at context {CONTEXT} ...", flush=True)
                run = run_measured(cmd, OUT / f"context-export-{label}-{tag(recipe)}.log")
                print(f"  {run}", flush=True)
                if run["exit_code"] != 0:
                    raise SystemExit(f"export failed: see {run['log']}")
            todo.append((label, str(out)))
    rows = []
    for label, folder in todo + artifacts:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        result = OUT / f"context-{label}.json"
        cmd = [sys.executable, "-m", "benchmarks.context", "--measure", folder, "--tokens", str(tokens),
               "--threads", str(threads)]
        print(f"measure {label} ({folder}) ...", flush=True)
        run = run_measured(cmd, OUT / f"context-measure-{label}.log", stdout=result)
        if run["exit_code"] != 0:
            raise SystemExit(f"measuring {label} failed: see {run['log']}")
        got = json.loads(result.read_text())
        first = got["positions"][0]["decode_tok_s"]
        for r in got["positions"]:
            r["vs_first_position"] = round(r["decode_tok_s"] / first, 3)
        row = {"label": label, "format": manifest["format"], "recipe": manifest["recipe"]["name"],
               "artifact": folder, "threads": threads, "tokens_per_position": tokens,
               "kv_cache": manifest["program"].get("kv_cache"), "peak_rss_gib": run["peak_rss_gib"], **got}
        print(f"  {row}", flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="onnx,tflite,pte")
    ap.add_argument("--recipe", default="int4-b32-rtn")
    ap.add_argument("--artifact", action="append", default=[])
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--kv-dtypes", default="fp32", help="export each format with each (fp32,int8: side by side)")
    ap.add_argument("--measure")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), POSITIONS, args.tokens, args.threads)))
        return
    if len(args.artifact) != len(args.label):
        raise SystemExit("give one --label per --artifact")
    OUT.mkdir(parents=True, exist_ok=True)
    formats = [f for f in args.formats.split(",") if f]
    kvs = [k for k in args.kv_dtypes.split(",") if k]
    rows = bench(formats, args.recipe, list(zip(args.label, args.artifact)), args.tokens, args.threads, args.reuse, kvs)
    write(f"context-270m-{tag(args.recipe)}" + ("" if kvs == ["fp32"] else "-kv-" + "-".join(kvs)), rows)


if __name__ == "__main__":
    main()
