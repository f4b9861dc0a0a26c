"""`make bench`, stock runtimes: the real 270M, exported to each format, run by the runtime's own
LLM API (ExecuTorch's TextLLMRunner, onnxruntime-genai, LiteRT-LM) against the PyTorch reference:
32 greedy tokens after a short prompt, after one longer than the 512 window, and after a chat
prompt (the base 270M never learned <end_of_turn>, so the stop itself is tested on the tiny model).

Usage: python -m benchmarks.stock [--formats pte,onnx,tflite] [--recipe fp32]
Writes benchmarks/results/stock-270m-<format>-<recipe>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "out" / "bench-stock"
TEXT = ROOT / "tests" / "data" / "gpl-3.txt"


def export(fmt: str, recipe: str) -> Path:
    out = OUT / f"270m-{fmt}-{recipe}"
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "gemma_export", "export", "gemma3-270m", "--format", fmt, "--recipe",
                        recipe, "--out", str(out), "--force", "--prefill-len", "128", "--max-context", "2048",
                        "--no-debug-outputs"], check=True, cwd=ROOT)
    return out


def measure(fmt: str, recipe: str) -> dict:
    from gemma_export.artifact import read_manifest
    from gemma_export.runtime import reference_for
    from gemma_export.verification.stock import prompts, stock_parity

    out = export(fmt, recipe)
    ref = reference_for(read_manifest(out))
    rows = []
    for name, text in prompts(ref.tokenizer, TEXT.read_text(), 512).items():
        start = time.perf_counter()
        r = stock_parity(out, name, text, 32, ref)
        rows.append({**r.to_dict(), "seconds": round(time.perf_counter() - start, 1)})
        print(f"{fmt} {recipe} {name}: {r.prompt_tokens} prompt tokens, match={r.match} {r.stock_text!r}", flush=True)
    return {"model": "gemma3-270m", "format": fmt, "recipe": recipe, "artifact": str(out.relative_to(ROOT)),
            "new_tokens": 32, "prompts": rows, "all_match": all(r["match"] for r in rows)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="pte,onnx,tflite")
    ap.add_argument("--recipe", default="fp32")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for fmt in args.formats.split(","):
        result = measure(fmt, args.recipe)
        (RESULTS / f"stock-270m-{fmt}-{args.recipe}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
