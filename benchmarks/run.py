"""`make bench`: long measurements, written as JSON under benchmarks/results/.

  export   wall time, peak RSS and artifact size of each export (real 270M; 1B random weights), and
           the peak the export estimated for itself before starting
  parity   `gemma-export verify` of each real-270M artifact (teacher-forced 1,300 tokens + 32 greedy)
  speed    prefill and decode tokens/s of each real-270M artifact (prompt 128, 128 new tokens; median of 5)
  eval     `gemma-export eval` of each real-270M artifact: perplexity on held-out text, and KL /
           top-1 agreement against the fp32 PyTorch model (the recipe x format quality table)

Usage: python -m benchmarks.run [--only export,parity,speed,eval] [--formats onnx,tflite,pte]
                                [--models 270m,1b] [--recipes fp32,int8,int4-b32,int4-b32-rtn,int4-mixed]
Each export runs in its own process so its peak RSS is its own. A (format, recipe) pair the format
cannot lower is recorded as a row with "unsupported" and the reason, not skipped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.llamacpp_flags import describe_cpu
from gemma_export.loading import bundled_gguf

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "out" / "bench"
GE = [sys.executable, "-m", "gemma_export"]
MODELS = {"270m": ["gemma3-270m"], "1b": ["gemma3-1b", "--random-weights"]}


def unsupported(fmt: str, recipe: str) -> str | None:
    from gemma_export.backends import get
    from gemma_export.quant.recipes import resolve

    return get(fmt).lowering.refusal(resolve(recipe))


def run_measured(cmd: list[str], log: Path, stdout: Path | None = None) -> dict:
    """Run a command; return wall seconds, peak RSS (its own, from wait4) and exit code. Its stderr
    (and stdout, unless `stdout` names a file for it) go to `log`."""
    start = time.perf_counter()
    with log.open("w") as f, (stdout.open("w") if stdout else open(os.devnull, "w")) as out:
        proc = subprocess.Popen(cmd, stdout=out if stdout else f, stderr=f, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    return {
        "command": " ".join(cmd[2:] if cmd[:3] == GE else cmd).replace("gemma_export", "gemma-export"),
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
        "exit_code": os.waitstatus_to_exitcode(status),
        "log": str(log.relative_to(ROOT)),
    }


def tag(recipe: str) -> str:
    """A recipe's name in file names: a preset's own, a recipe file's stem."""
    return Path(recipe).stem if recipe.endswith((".toml", ".json")) else recipe


def artifact_dir(model: str, fmt: str, recipe: str = "fp32") -> Path:
    return OUT / f"{model}-{fmt}-{tag(recipe)}"


def bench_export(models, formats, recipe="fp32") -> list[dict]:
    from gemma_export.quant.recipes import resolve

    rows = []
    for model in models:
        todo = []
        for fmt in formats:
            if reason := unsupported(fmt, recipe):
                rows.append({"model": model, "format": fmt, "recipe": recipe, "unsupported": reason})
            else:
                todo.append(fmt)
        if model != "270m" and resolve(recipe).needs_calibration and len(todo) > 1:
            # calibration takes tens of minutes on the 1B: quantize once, convert to every format
            rows += export_together(model, todo, recipe)
            continue
        for fmt in todo:
            out = artifact_dir(model, fmt, recipe)
            record = OUT / f"export-{model}-{fmt}-{tag(recipe)}.build.json"
            cmd = [*GE, "export", *MODELS[model], "--format", fmt, "--out", str(out), "--force", "--recipe", recipe,
                   "--build-record", str(record)]
            if model != "270m":
                cmd.append("--no-debug-outputs")  # release-style artifact; the debug entry is tested on 270M
            print(f"export {model} {fmt} {tag(recipe)} ...", flush=True)
            row = {"model": model, "format": fmt, "recipe": recipe,
                   **run_measured(cmd, OUT / f"export-{model}-{fmt}-{tag(recipe)}.log")}
            if row["exit_code"] == 0:
                row.update(sizes(out), export_seconds=build_seconds(record, fmt), **estimated(record, row["peak_rss_gib"]))
            print(f"  {row}", flush=True)
            rows.append(row)
    return rows


def sizes(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    # model_file_mib: the model itself (graph/program and external weights), without the tokenizer;
    # for an NPU artifact, what one SoC's device loads: its compiled graphs and context binaries
    compiled = m["program"].get("compile", {}).get("socs", {})
    if compiled:
        graphs = next(iter(compiled.values())).values()
        model = {name for g in graphs for name in (g["file"], g["binary"])}
    else:
        model = {name for name in m["files"] if name.startswith("model.")}
    return {"artifact_mib": round(sum(f["bytes"] for f in m["files"].values()) / 2**20, 1),
            "model_file_mib": round(sum(m["files"][name]["bytes"] for name in model) / 2**20, 1)}


def estimated(record: Path, peak_gib: float) -> dict:
    """The export's own estimate of its peak memory (printed before it started), beside the peak measured."""
    est = json.loads(record.read_text())["estimate"]["peak_memory_gib"]
    return {"estimate_peak_gib": est, "estimate_error": round(est / peak_gib - 1, 3)}


def build_seconds(record: Path, fmt: str) -> float:
    """The shared load-and-quantize time plus this format's conversion, from the build record."""
    seconds = json.loads(record.read_text())["seconds"]
    return round(seconds["load_and_quantize"] + seconds[fmt], 1)


def export_together(model: str, formats: list[str], recipe: str) -> list[dict]:
    """One `export --format a,b,c` process (one calibration): wall time and peak RSS are the whole
    run's, repeated on each format's row; export_seconds is the shared part plus that conversion."""
    build = OUT / f"{model}-{tag(recipe)}-together"
    record = OUT / f"export-{model}-together-{tag(recipe)}.build.json"
    cmd = [*GE, "export", *MODELS[model], "--format", ",".join(formats), "--out", str(build), "--force",
           "--recipe", recipe, "--no-debug-outputs", "--build-record", str(record)]
    print(f"export {model} {','.join(formats)} {tag(recipe)} (quantized once) ...", flush=True)
    run = run_measured(cmd, OUT / f"export-{model}-together-{tag(recipe)}.log")
    rows = []
    for fmt in formats:
        row = {"model": model, "format": fmt, "recipe": recipe, "together": formats, **run}
        if run["exit_code"] == 0:
            row.update(sizes(build / fmt), export_seconds=build_seconds(record, fmt), **estimated(record, run["peak_rss_gib"]))
        print(f"  {row}", flush=True)
        rows.append(row)
    return rows


def run_with_report(command: str, stage: str, fmt: str, recipe: str, args=()) -> dict:
    """`gemma-export COMMAND ARTIFACT --json` on a 270M artifact, measured, merged with the JSON it printed."""
    out, report = artifact_dir("270m", fmt, recipe), OUT / f"{stage}-270m-{fmt}-{tag(recipe)}.json"
    print(f"{command} 270m {fmt} {tag(recipe)} ...", flush=True)
    row = run_measured([*GE, command, str(out), *args, "--json"], OUT / f"{command}-270m-{fmt}-{tag(recipe)}.log", report)
    try:
        row.update(json.loads(report.read_text()))
    except (OSError, json.JSONDecodeError):
        pass  # the command failed before printing its result: the row keeps its exit code and log
    return row


def bench_parity(formats, recipe="fp32") -> list[dict]:
    rows = []
    for fmt in formats:
        if unsupported(fmt, recipe):
            continue
        row = run_with_report("verify", "parity", fmt, recipe)
        print(f"  pass={row.get('pass')} top1={row.get('top1_agreement')} kl={row.get('mean_kl')}", flush=True)
        rows.append(row)
    return rows


def bench_speed(formats, recipe="fp32", prompt_len=128, new_tokens=128, threads=2, repeats=5) -> list[dict]:
    """Our artifacts between two runs of llama.cpp on the same ids (its speed drifts with the
    machine's): each row's ratios are against the faster of llama.cpp's two medians."""
    import numpy as np

    from benchmarks import llamacpp
    from gemma_export.runtime import open_artifact

    ids = np.random.default_rng(0).integers(10, 200_000, size=prompt_len).tolist()
    # llama.cpp gets the context our artifacts were exported with
    context = max(json.loads((artifact_dir("270m", f, recipe) / "manifest.json").read_text())["max_context"]
                  for f in formats if not unsupported(f, recipe))
    peer = [llamacpp.speed(ids, new_tokens, threads, repeats, context) | {"measured": "before"}]
    print(f"  {peer[0]}", flush=True)
    bandwidth = read_bandwidth_gbs(threads)
    rows = []
    for fmt in formats:
        if unsupported(fmt, recipe):
            continue
        out = artifact_dir("270m", fmt, recipe)
        opened = open_artifact(out, threads)
        s = opened.session
        s.reset()
        s.prefill_last(ids[: s.info.prefill_len], 0)  # warm-up
        prefill, decode = [], []
        for _ in range(repeats):  # one prefill is a fraction of a second: take the median of a few runs
            s.reset()
            t0 = time.perf_counter()
            pos = 0
            logits = None
            while pos < prompt_len:
                chunk = ids[pos:pos + s.info.prefill_len]
                logits = s.prefill_last(chunk, pos)
                pos += len(chunk)
            t1 = time.perf_counter()
            tok = int(np.argmax(logits))
            for _ in range(new_tokens):
                tok = int(np.argmax(s.decode(tok, pos)))
                pos += 1
            t2 = time.perf_counter()
            prefill.append(prompt_len / (t1 - t0))
            decode.append(new_tokens / (t2 - t1))
        row = {"format": fmt, "recipe": recipe, "threads": threads, "prompt_tokens": prompt_len,
               "new_tokens": new_tokens, "repeats": repeats,
               "prefill_tok_s": round(float(np.median(prefill)), 1), "decode_tok_s": round(float(np.median(decode)), 1),
               "time_to_first_token_s": round(prompt_len / float(np.median(prefill)), 3),
               "prefill_tok_s_runs": [round(v, 1) for v in prefill], "decode_tok_s_runs": [round(v, 1) for v in decode]}
        row |= bandwidth_used(bytes_read_per_token(out), row["decode_tok_s"], bandwidth)
        print(f"  {row}", flush=True)
        rows.append(row)
    peer.append(llamacpp.speed(ids, new_tokens, threads, repeats, context) | {"measured": "after"})
    print(f"  {peer[1]}", flush=True)
    best = {k: max(p[k] for p in peer) for k in ("prefill_tok_s", "decode_tok_s")}
    for row in rows:
        row["vs_llamacpp"] = {k.removesuffix("_tok_s"): round(row[k] / best[k], 2) for k in best}
    for p in peer:
        p["model"] = "llama.cpp"  # its own key in the results file: one row per measurement
        p["format"] = f"llama.cpp ({p['measured']})"
        p |= bandwidth_used(bundled_gguf().stat().st_size, p["decode_tok_s"], bandwidth)
    return [{"format": "machine", "recipe": recipe, "read_bandwidth_gbs": bandwidth, "threads": threads,
             **describe_cpu()}] + peer + rows


def bandwidth_used(read_per_token: int, decode_tok_s: float, bandwidth_gbs: float) -> dict:
    """Weight bytes a decode step reads, and their rate as a share of the measured read bandwidth."""
    return {"weight_bytes_read_per_token": read_per_token,
            "bandwidth_fraction": round(read_per_token * decode_tok_s / (bandwidth_gbs * 1e9), 3)}


def read_bandwidth_gbs(threads: int) -> float:
    """Memory read bandwidth with `threads` threads: a 1 GiB fp32 sum, best of 5."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t0)
    return round(x.numel() * 4 / best / 1e9, 1)


def bytes_read_per_token(folder: Path) -> int:
    """Bytes of weights one decode step reads: the artifact's files without the tokenizer, less
    any copy of a table that is only gathered from (one row per token). The head reads the whole
    tied table; an ONNX graph may keep a second, row-major copy for its Gather."""
    m = json.loads((folder / "manifest.json").read_text())
    # an ONNX score graph (debug) is not run to generate and reads the decoder's weights file
    score = m["program"].get("score_graph")
    files = [name for name in m["files"] if "tokenizer" not in name and name != score]
    total = sum(m["files"][name]["bytes"] for name in files)
    return total - sum(_gathered_only_bytes(folder / name) for name in files if name.endswith(".onnx"))


def _gathered_only_bytes(graph: Path) -> int:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    uses: dict[str, set] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, i))
    size = 0
    for init in model.graph.initializer:
        if uses.get(init.name) == {("Gather", 0)}:
            ext = {e.key: e.value for e in init.external_data}
            size += int(ext["length"]) if "length" in ext else len(init.raw_data)
    return size


def bench_eval(formats, recipe="fp32", positions=1024) -> list[dict]:
    rows = []
    for fmt in formats:
        if unsupported(fmt, recipe):
            continue
        row = {"format": fmt, "recipe": recipe,
               **run_with_report("eval", "eval", fmt, recipe, ["--positions", str(positions)])}
        if "perplexity" in row:
            m = json.loads((artifact_dir("270m", fmt, recipe) / "manifest.json").read_text())
            row["artifact_mib"] = round(sum(f["bytes"] for f in m["files"].values()) / 2**20, 1)
        print(f"  ppl={row.get('perplexity')} kl={row.get('mean_kl')} top1={row.get('top1_agreement')}", flush=True)
        rows.append(row)
    return rows


KEYS = ("model", "format", "recipe")


def write(name: str, rows) -> None:
    """Write results, keeping earlier rows for (model, format, recipe) combinations not re-run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    if path.is_file():
        fresh = {tuple(r.get(k) for k in KEYS) for r in rows}
        old = json.loads(path.read_text()).get("results", [])
        rows = [r for r in old if tuple(r.get(k) for k in KEYS) not in fresh] + list(rows)
    doc = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), **describe_cpu()}, "results": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote benchmarks/results/{name}.json", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="export,parity,speed,eval")
    ap.add_argument("--formats", default="onnx,tflite,pte")
    ap.add_argument("--models", default="270m,1b")
    ap.add_argument("--recipes", default="fp32,int8,int4-b32-rtn,int4-b32,int4-mixed")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    only, formats, models = args.only.split(","), args.formats.split(","), args.models.split(",")
    for recipe in args.recipes.split(","):
        if "export" in only:
            write(f"export-{tag(recipe)}", bench_export(models, formats, recipe))
        if "parity" in only:
            write(f"parity-270m-{tag(recipe)}", bench_parity(formats, recipe))
        if "speed" in only:
            write(f"speed-270m-{tag(recipe)}", bench_speed(formats, recipe))
        if "eval" in only:
            write(f"eval-270m-{tag(recipe)}", bench_eval(formats, recipe))


if __name__ == "__main__":
    main()
