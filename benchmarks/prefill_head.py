"""ONNX prefill with the head on the last position against the head on every position.

An ONNX artifact exported with debug outputs holds both graphs over the same weights: `model.onnx`
(what onnxruntime-genai runs; the head on the chunk's last position) and `score.onnx` (every
position's logits, for verification). One process drives both on the same buffers, alternating
them round by round: prefill of the same random prompt ids, then greedy decode steps, medians.

  python -m benchmarks.prefill_head --artifact DIR [--artifact DIR ...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gemma_export.artifact import read_manifest

from .run import read_bandwidth_gbs, write


def measure(folder: Path, prompt_len: int, new_tokens: int, rounds: int, repeats: int, threads: int) -> dict:
    from gemma_export.runtime import open_artifact

    s = open_artifact(folder, threads).session
    score = s._scoring()
    if score is None:
        raise SystemExit(f"{folder}: no score graph (exported with --no-debug-outputs)")
    ids = np.random.default_rng(0).integers(10, 200_000, size=(1, prompt_len))
    graphs = {"last position (model.onnx)": s._sess, "every position (score.onnx)": score}
    times = {name: {"prefill": [], "decode": []} for name in graphs}
    tokens = {}
    for _ in range(rounds):
        for name, sess in graphs.items():
            for _ in range(repeats):
                s.reset()
                t = time.perf_counter()
                logits = s._step(ids, 0, sess=sess)[0]
                times[name]["prefill"].append(time.perf_counter() - t)
            out, tok = [], int(np.argmax(logits[-1]))
            for i in range(new_tokens):
                t = time.perf_counter()
                tok = int(np.argmax(s._step(np.array([[tok]]), prompt_len + i, sess=sess)[0][-1]))
                times[name]["decode"].append(time.perf_counter() - t)
                out.append(tok)
            tokens[name] = out
    rows = []
    for name, t in times.items():
        rows.append({"artifact": str(folder), "graph": name,
                     "prefill_tok_s": round(prompt_len / float(np.median(t["prefill"])), 1),
                     "decode_tok_s": round(1 / float(np.median(t["decode"])), 1),
                     "greedy_equal": tokens[name] == tokens["last position (model.onnx)"]})
    rows[0]["prefill_vs_every_position"] = round(rows[0]["prefill_tok_s"] / rows[1]["prefill_tok_s"], 2)
    return {"rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", action="append", required=True)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    rows = []
    bandwidth = read_bandwidth_gbs(a.threads)
    for folder in a.artifact:
        for row in measure(Path(folder), a.prompt_len, a.new_tokens, a.rounds, a.repeats, a.threads)["rows"]:
            m = read_manifest(Path(folder))
            row.update(model=m.model.name, format="onnx", recipe=m.recipe["name"], threads=a.threads,
                       read_bandwidth_gbs=bandwidth)
            rows.append(row)
            print(row, flush=True)
    write("prefill-head-onnx", rows)


if __name__ == "__main__":
    main()
