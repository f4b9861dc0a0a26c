"""Per-operator profile of decode steps: where one token's time goes, per format.

Each artifact is prefilled to a position with random ids, then `--steps` greedy decode steps run
under the runtime's own profiler; the table sums each operator over those steps and gives its
share of their wall time.

  onnx   onnxruntime's profiler (SessionOptions.enable_profiling): one event per node and run
  pte    ExecuTorch's ETDump (load_program(enable_etdump=True)) read by its devtools Inspector: one
         event per portable/custom kernel and per XNNPACK operator inside the delegate, and the
         calls around them
  tflite not profiled: ai-edge-litert's Python API has no operator profiler, and its
         benchmark_model binary is not in the wheel

Usage: python -m benchmarks.profile [--recipe int4-b32-rtn] [--formats onnx,tflite,pte] [--position 128]
Artifacts are those of `benchmarks.run` (out/bench/270m-FORMAT-RECIPE), or --artifact DIR.
Results: benchmarks/results/profile-270m-RECIPE[-LABEL].json.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.run import artifact_dir, tag, write
from gemma_export.artifact import read_manifest
from gemma_export.backends.executorch import PteSession
from gemma_export.backends.onnx import OnnxSession

TOP = 15


class _ProfiledOnnx(OnnxSession):
    profile_dir: str = ""

    def _options(self, quantized: bool):
        opts = super()._options(quantized)
        if quantized:  # the decoder graph only
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(self.profile_dir) / "ort")
        return opts


class _ProfiledPte(PteSession):
    etdump = True


def _drive(session, position: int, steps: int) -> float:
    """Prefill `position` random ids, then `steps` greedy decode steps; their wall seconds."""
    ids = np.random.default_rng(0).integers(10, 200_000, size=position).tolist()
    session.reset()
    pos, logits = 0, None
    while pos < position:
        chunk = ids[pos:pos + session.info.prefill_len]
        logits = session.prefill_last(chunk, pos)
        pos += len(chunk)
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = int(np.argmax(session.decode(tok, pos)))
        pos += 1
    return time.perf_counter() - t0


def profile_onnx(folder: Path, position: int, steps: int, threads: int) -> tuple[dict, float, float]:
    """Node times by op type over the last `steps` runs of the decoder, and those runs' total."""
    with tempfile.TemporaryDirectory() as tmp:
        cls = type("Profiled", (_ProfiledOnnx,), {"profile_dir": tmp})
        session = cls(folder, read_manifest(folder), threads)
        wall = _drive(session, position, steps)
        trace = json.loads(Path(session._sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"][-steps:]
    ops: dict[str, float] = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]["ts"]:
            ops[e["args"]["op_name"]] += e["dur"] / 1e6
    return ops, sum(r["dur"] for r in runs) / 1e6, wall


# ETDump's wrappers around the operators they time: a delegate call's time holds the delegate's
# operators plus the call itself, an operator call's the kernel plus the dispatch
WRAPPERS = {"DELEGATE_CALL", "OPERATOR_CALL", "Method::execute", "Program::load_method"}


def profile_pte(folder: Path, position: int, steps: int, threads: int) -> tuple[dict, float, float]:
    """Operator times by name (XNNPACK's per-delegate instance numbers dropped) over the last
    `steps` runs of forward, and those runs' total."""
    from executorch.devtools import Inspector

    session = _ProfiledPte(folder, read_manifest(folder), threads)
    wall = _drive(session, position, steps)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.etdp"
        session._program.write_etdump_result_to_file(str(path), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(path))
    # the Inspector merges every run of a method into one block, one time per run in each event
    block = max(inspector.event_blocks, key=lambda b: sum(e.name == "DELEGATE_CALL" for e in b.events))
    ops: dict[str, float] = defaultdict(float)
    wrapped: dict[str, float] = defaultdict(float)
    for event in block.events:
        if event.perf_data is None:
            continue
        seconds = sum(event.perf_data.raw[-steps:]) / 1e3  # the Inspector's unit is ms
        if event.name in WRAPPERS:
            wrapped[event.name] += seconds
        else:
            ops[re.sub(r" #\d+$", "", event.name)] += seconds
            wrapped["delegated" if event.is_delegated_op else "native"] += seconds
    ops["(XNNPACK delegate calls, outside its operators)"] = wrapped["DELEGATE_CALL"] - wrapped["delegated"]
    ops["(operator dispatch, outside the kernels)"] = wrapped["OPERATOR_CALL"] - wrapped["native"]
    return ops, wrapped["Method::execute"], wall


PROFILERS = {"onnx": profile_onnx, "pte": profile_pte}
UNPROFILED = {"tflite": "ai-edge-litert's Python API has no operator profiler, and its benchmark_model binary "
                        "is not in the wheel"}


def measure(fmt: str, folder: Path, position: int, steps: int, threads: int) -> dict:
    """The top operators' share of a step's wall time; what the runtime spends outside its
    operators, and the time outside the runtime (Python, the argmax), are rows of their own."""
    ops, runtime, wall = PROFILERS[fmt](folder, position, steps, threads)
    ops["(runtime, outside its operators)"] = runtime - sum(ops.values())
    ops["(outside the runtime: Python, argmax, logits copy)"] = wall - runtime
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:TOP]
    return {"format": fmt, "artifact": str(folder), "position": position, "steps": steps, "threads": threads,
            "decode_tok_s_profiled": round(steps / wall, 1), "ms_per_step": round(1e3 * wall / steps, 2),
            "runtime_ms_per_step": round(1e3 * runtime / steps, 2),
            "top_ops": [{"op": name, "ms_per_step": round(1e3 * t / steps, 3), "share": round(t / wall, 3)}
                        for name, t in top]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="int4-b32-rtn")
    ap.add_argument("--formats", default="onnx,tflite,pte")
    ap.add_argument("--artifact", type=Path, help="one artifact folder instead of benchmarks.run's")
    ap.add_argument("--position", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="", help="suffix of the results file (profile-270m-RECIPE-LABEL.json)")
    args = ap.parse_args(argv)
    rows = []
    for fmt in args.formats.split(","):
        folder = args.artifact or artifact_dir("270m", fmt, args.recipe)
        if fmt not in PROFILERS:
            rows.append({"format": fmt, "recipe": args.recipe, "unsupported": UNPROFILED.get(fmt, "no profiler")})
            continue
        row = measure(fmt, folder, args.position, args.steps, args.threads) | {
            "recipe": args.recipe, "kv_dtype": read_manifest(folder).kv_dtype}
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    write(f"profile-270m-{tag(args.recipe)}" + (f"-{args.label}" if args.label else ""), rows)


if __name__ == "__main__":
    main()
