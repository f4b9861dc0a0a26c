"""The qnn artifact of the real 270M on the emulated Hexagon NPU, against fp32, against its recipe in
PyTorch and against its own QDQ graphs on the CPU (the recipe without the compiler), in one
teacher-forced pass; then greedy tokens on the HTP and in fp32.

Usage: python -m benchmarks.npu [--artifact out/bench/270m-qnn-a16w8] [--positions 1280]
                                [--schedule prefill|mixed] [--new-tokens 32]
The x86-64 HTP emulator is slow (tens of seconds per decode step on the 270M), so `--schedule
prefill` feeds full prefill chunks only; `mixed` is verify's schedule (chunks, partial chunks and
decode steps). Results: benchmarks/results/npu-270m-<recipe>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import calibration
from gemma_export.artifact import read_manifest
from gemma_export.backends.qnn import QnnSession
from gemma_export.loading import Tokenizer
from gemma_export.runtime import reference_for
from gemma_export.session import generate
from gemma_export.verification.parity import schedule_for, teacher_forced_many

from .run import OUT, write

KEYS = ("positions", "top1_agreement", "top5_overlap", "mean_kl", "max_kl", "min_cosine", "perplexity_reference",
        "perplexity_test")
PAIRS = [("fp32", "htp"), ("fp32", "recipe"), ("fp32", "simulated"), ("recipe", "htp"), ("simulated", "htp")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", default=str(OUT / "270m-qnn-a16w8"))
    ap.add_argument("--positions", type=int, default=1280)
    ap.add_argument("--schedule", choices=("prefill", "mixed"), default="prefill")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    folder = Path(args.artifact)
    m = read_manifest(folder)
    fp32, recipe = reference_for(m, quantized=False), reference_for(m, quantized=True)
    tok = Tokenizer(folder / m.tokenizer.file)
    ids = tok.encode(Path(calibration.EVAL_TEXT).read_text())[:args.positions]
    sessions = {"fp32": fp32.session, "recipe": recipe.session, "simulated": QnnSession(folder, m, simulated=True),
                "htp": QnnSession(folder, m)}
    schedule = [m.prefill_len] if args.schedule == "prefill" else schedule_for(m.prefill_len)
    t0 = time.perf_counter()
    got = teacher_forced_many(sessions, PAIRS, ids, schedule,
                              progress=lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True))
    seconds = time.perf_counter() - t0
    row = {"model": "270m", "format": "qnn", "artifact": str(folder), "recipe": m.recipe_name, "soc": sessions["htp"].soc,
           "precision": m.program["precision"], "schedule": schedule, "teacher_forced_s": round(seconds, 1),
           **{f"{a}_vs_{b}": {k: v for k, v in got[(a, b)].summary().items() if k in KEYS} for a, b in PAIRS}}
    for key, c in row.items():
        print(key, c, flush=True)
    if args.new_tokens:
        prompt = tok.encode("The capital of France is")
        t1 = time.perf_counter()
        htp = list(generate(sessions["htp"], prompt, args.new_tokens))
        row["greedy_htp_s"] = round(time.perf_counter() - t1, 1)
        ref = list(generate(fp32.session, prompt, args.new_tokens))
        same = next((i for i, (a, b) in enumerate(zip(ref, htp)) if a != b), len(ref))
        row.update(greedy_fp32=tok.decode(ref), greedy_htp=tok.decode(htp), greedy_equal_prefix=same,
                   greedy_tokens=len(ref))
        print({k: row[k] for k in ("greedy_fp32", "greedy_htp", "greedy_equal_prefix")}, flush=True)
    write(f"npu-270m-{m.recipe_name}", [row])


if __name__ == "__main__":
    main()
