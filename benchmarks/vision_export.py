"""What converting Gemma 3's vision tower (SigLIP + projector, fp32) costs in each exporter, and
whether the converted graph still computes what PyTorch does: pixels [1, 3, S, S] -> image
embeddings [1, 256, hidden], run in the format's runtime on a real photograph.

This measures the encoder alone, converted with each backend's own piece, as its artifacts carry
it: ONNX's vision.onnx (onnxruntime-genai's vision graph), the LiteRT-LM vision encoder and adapter
sections, the `vision_encoder` method lowered to XNNPACK. Each format runs in its own process, so
peak RSS is that export's alone.

Usage: python -m benchmarks.vision_export [--model gemma3-4b|tiny] [--formats onnx,tflite,pte]
Writes benchmarks/results/vision-export-{model}.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FORMATS = ("onnx", "tflite", "pte")


def _one(model: str, fmt: str, out: Path) -> dict:
    """Convert, run and compare one format, in this process."""
    import matplotlib
    import numpy as np
    import torch

    from gemma_export.gemma3.images import ImageSettings, preprocess
    from gemma_export.gemma3.vision import random_vision, vision_preset

    torch.set_num_threads(2)
    vc = vision_preset(model)
    vision = random_vision(vc, seed=0)
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    px = torch.from_numpy(preprocess(photo, ImageSettings(size=vc.image_size)).pixels)
    with torch.no_grad():
        ref = vision(px).numpy()
    t0 = time.perf_counter()
    if fmt == "onnx":
        import onnxruntime as ort

        from gemma_export.backends import onnx

        onnx._trace_vision(vision, out, lambda m: None)
        seconds = time.perf_counter() - t0
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        got = ort.InferenceSession(str(out / onnx.VISION_FILE), opts, providers=["CPUExecutionProvider"]).run(
            None, {"pixel_values": px.numpy()})[0]
    elif fmt == "tflite":
        import litert_torch
        from ai_edge_litert.interpreter import Interpreter

        from gemma_export.backends import tflite

        paths = tflite._convert_vision(vision, out, litert_torch, lambda m: None)
        seconds = time.perf_counter() - t0
        got = px.numpy()
        for name in (tflite.VISION_ENCODER, tflite.VISION_ADAPTER):
            runner = Interpreter(model_path=str(paths[name]), num_threads=2).get_signature_runner()
            (got,) = runner(**{runner.get_input_details().popitem()[0]: got}).values()
    else:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime

        from gemma_export.backends import executorch

        path = out / "vision.pte"
        with torch.no_grad():
            ep = executorch._export_vision(vision, px)
            prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
        path.write_bytes(prog.buffer)
        seconds = time.perf_counter() - t0
        method = Runtime.get().load_program(str(path)).load_method("forward")
        got = method.execute([px])[0].numpy()
    files = [p for p in out.iterdir() if p.is_file()]
    return {
        "model": model, "format": fmt, "parameters": vc.param_count(),
        "export_seconds": round(seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "file_mib": round(sum(p.stat().st_size for p in files) / 2**20, 1),
        "output_shape": list(got.shape),
        "max_abs_diff_relative": float(np.abs(got - ref).max() / np.abs(ref).max()),
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-4b")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one format in this process
    args = ap.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(_one(args.model, args.one, Path(d))))
        return
    rows = []
    for fmt in args.formats.split(","):
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "benchmarks.vision_export", "--model", args.model, "--one", fmt],
                             capture_output=True, text=True)
        if run.returncode:
            row = {"model": args.model, "format": fmt, "error": (run.stderr.strip().splitlines() or ["?"])[-1][:400],
                   "exit_code": run.returncode}
        else:
            row = json.loads(run.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.perf_counter() - t, 1)
        row["measured"] = time.strftime("%Y-%m-%d")
        print(row, flush=True)
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"vision-export-{args.model}.json"
    # a run of some formats replaces their rows and keeps the others' (each row says when it ran)
    kept = [r for r in (json.loads(path.read_text())["rows"] if path.is_file() else [])
            if r["format"] not in {r["format"] for r in rows}]
    out = {"command": f"python -m benchmarks.vision_export --model {args.model} --formats {','.join(FORMATS)}",
           "rows": sorted(kept + rows, key=lambda r: FORMATS.index(r["format"]))}
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
