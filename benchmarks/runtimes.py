"""Our artifact against each stock runtime's OWN exporter, measured inside that runtime (issue #17).

For each (runtime, recipe class) both artifacts come from the same fp32 weights (the bundled
270M): ours from `gemma-export export`, the peer from the exporter the runtime ships or documents
(`benchmarks.peers`). Each is then driven only through the runtime's public API:

  ort-genai   onnxruntime-genai (og.Model / Generator): ours `--format onnx` vs its model builder
  executorch  ExecuTorch's LLM runner (TextLLMRunner) and `executorch.runtime`: ours `--format pte`
              vs optimum-executorch's XNNPACK recipe
  litert-lm   LiteRT-LM's engine (litert_lm.Engine / Session): ours `--format tflite` (a .litertlm
              bundle) vs litert-torch's HF exporter with `--bundle_litert_lm`

  recipe class  ours            ort-genai builder   optimum-executorch
  int4          int4-b32        -p int4 (block 32)  --qlinear 8da4w (group 32)
  int8          int8            -p int8             --qlinear 8da8w

  recipe class  litert-torch (ai-edge-quantizer recipe)
  int4          dynamic_wi4b32_afp32
  int8          dynamic_wi8_afp32

Measured per artifact, each measurement in its own process (so its peak RSS is its own): speed in
three rounds, the two sides alternating which runs first (ours, peer; peer, ours; ours, peer), then
perplexity of both (both sides of a ratio under the same background load):
  speed   the runtime's own generation API: prefill tok/s on a 512-token prompt and decode tok/s
          over 64 greedy new tokens (median of 3 after a warm-up, in each round; the row gives the
          median over the rounds, each round under `rounds`), and the largest peak RSS of a round's
          process (load + prefill + decode). ExecuTorch: TextLLMRunner, rates from its own Stats;
          LiteRT-LM: rates from the engine's own benchmark info (its tokenizer, the same text).
  loop    (ExecuTorch) the same through executorch.runtime `forward` calls, chunked as the program
          allows; the ratios use it when the runner cannot drive one of the two programs
  ppl     perplexity on 1,024 held-out tokens (tests/data/gpl-3.txt after its first 2,048 tokens),
          teacher-forced through the runtime's logits, 128 tokens a call (or what the program takes);
          LiteRT-LM exposes no logits: its own text scoring (`run_text_scoring`) instead
  size    the model files (graph/program and weights, not the tokenizer)
plus, once, the fp32 PyTorch perplexity on the same tokens (the floor for both).

Usage: python -m benchmarks.runtimes [--runtimes ort-genai,executorch,litert-lm] [--recipes int4,int8]
                                     [--reuse-exports] [--results DIR]
Writes RESULTS/runtimes-<runtime>-<recipe>.json: both rows and the ratios ours/peer; artifacts,
logs and per-measurement JSON go under out/bench-runtimes/.
Measurement worker (what main runs per measurement):
  python -m benchmarks.runtimes measure RUNTIME ARTIFACT speed|loop|ppl JSON_OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "out" / "bench-runtimes"
HELD_OUT = ROOT / "tests" / "data" / "gpl-3.txt"
SKIP, POSITIONS, CHUNK = 2048, 1024, 128  # perplexity: tokens after the first 2,048, 128 per call
PROMPT, NEW_TOKENS, REPEATS = 512, 64, 3
CONTEXT, PREFILL_LEN = 2048, 128
OUR_RECIPE = {"int4": "int4-b32", "int8": "int8"}


@dataclass(frozen=True)
class Runtime:
    fmt: str  # our --format
    peer: str  # benchmarks.peers exporter
    peer_quant: dict  # recipe class -> the peer exporter's quantization argument
    model_files: tuple[str, ...]  # suffixes counted as the model (not the tokenizer)
    measurements: tuple[str, ...] = ("speed", "ppl")


RUNTIMES = {
    "ort-genai": Runtime("onnx", "genai-builder", {"int4": "int4", "int8": "int8"}, (".onnx", ".onnx.data")),
    # loop: the same program driven through executorch.runtime, for when the runner cannot drive one
    "executorch": Runtime("pte", "optimum-executorch", {"int4": "8da4w", "int8": "8da8w"}, (".pte", ".ptd"),
                          ("speed", "loop", "ppl")),
    "litert-lm": Runtime("tflite", "litert-torch", {"int4": "dynamic_wi4b32_afp32", "int8": "dynamic_wi8_afp32"},
                         (".litertlm",)),
}


# ----------------------------------------------------------------------------------------------
# Orchestration (main process): exports and measurements, each in a child process
# ----------------------------------------------------------------------------------------------


def run_measured(cmd: list[str], log: Path) -> dict:
    """benchmarks.run's measurement: wall seconds, the child's own peak RSS (wait4), exit code."""
    from benchmarks.run import run_measured as measured

    return measured(cmd, log)


def export_ours(runtime: str, recipe: str, out: Path, reuse: bool) -> dict:
    cmd = [sys.executable, "-m", "gemma_export", "export", "gemma3-270m", "--format", RUNTIMES[runtime].fmt,
           "--recipe", OUR_RECIPE[recipe], "--out", str(out), "--prefill-len", str(PREFILL_LEN),
           "--max-context", str(CONTEXT), "--no-debug-outputs", "--force"]
    return export(cmd, out, reuse)


def export_peer(runtime: str, recipe: str, out: Path, reuse: bool) -> dict:
    """The peer's exporter on the HF folder of our weights (written first, in its own process, so
    the peer's export row is the exporter alone)."""
    from benchmarks.peers import HF_DIR

    if not (HF_DIR / ".complete").is_file():
        export([sys.executable, "-m", "benchmarks.peers", "hf-folder", str(HF_DIR)], HF_DIR, reuse=False)
    rt = RUNTIMES[runtime]
    cmd = [sys.executable, "-m", "benchmarks.peers", rt.peer, str(out), rt.peer_quant[recipe]]
    return export(cmd, out, reuse)


def export(cmd: list[str], out: Path, reuse: bool) -> dict:
    """One export in its own process; its measurement is kept beside the artifact so a later run
    with --reuse-exports reports the export that made the artifact it measures."""
    record = out.parent / f"{out.name}.export.json"
    if reuse and record.is_file() and json.loads(record.read_text()).get("exit_code") == 0:
        print(f"reuse {out}", flush=True)
        return json.loads(record.read_text())
    print(f"export: {' '.join(cmd[2:])}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    row = run_measured(cmd, out.parent / f"{out.name}.export.log")
    row["command"] = " ".join(["python", *cmd[1:]])
    record.write_text(json.dumps(row, indent=2))
    print(f"  {row}", flush=True)
    return row


def measure(runtime: str, artifact: Path, what: str, name: str | None = None) -> dict:
    """One measurement in its own process: what it wrote as JSON, plus its wall time and peak RSS.
    Its report and log are OUT/NAME.json and OUT/NAME.log (default NAME: ARTIFACT.WHAT)."""
    name = name or f"{artifact.name}.{what}"
    report, log = OUT / f"{name}.json", OUT / f"{name}.log"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.runtimes", "measure", runtime, str(artifact), what, str(report)]
    print(f"{what}: {name} ...", flush=True)
    load = os.getloadavg()[0]  # other work on the machine slows both sides: recorded, not corrected
    row = run_measured(cmd, log)
    row["loadavg_1m_before"] = round(load, 2)
    try:
        row.update(json.loads(report.read_text()))
    except (OSError, json.JSONDecodeError):
        row["error"] = error_lines(log)  # the worker failed: the row keeps its exit code, log and why
    print(f"  {row}", flush=True)
    return row


def error_lines(log: Path, keep: int = 3) -> list[str]:
    """The last lines of a failed worker's log that say what went wrong."""
    marks = ("Error", "error", "Attempted", "Traceback", "failed")
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if any(m in ln for m in marks)]
    return lines[-keep:]


def model_mib(runtime: str, artifact: Path) -> dict:
    files = {p.name: p.stat().st_size for p in sorted(artifact.iterdir()) if p.is_file()}
    model = {n: b for n, b in files.items() if n.endswith(RUNTIMES[runtime].model_files)}
    return {"model_file_mib": round(sum(model.values()) / 2**20, 1), "model_files": sorted(model),
            "folder_mib": round(sum(files.values()) / 2**20, 1)}


def artifact_row(runtime: str, artifact: Path, export_row: dict) -> dict:
    row = {"artifact": str(artifact.relative_to(ROOT)), "export": export_row}
    if export_row.get("exit_code") == 0:
        row.update(model_mib(runtime, artifact))
    return row


SPEED_ROUNDS = 3  # rounds of the speed measurements, the two sides alternating which goes first
TIMED = ("speed", "loop")


def measure_all(runtime: str, rows: list[dict]) -> None:
    """Speed of both artifacts in alternating rounds (ours, peer; peer, ours; ...), then perplexity of
    both: on a shared machine whose speed drifts, both sides of a ratio see the same background load
    (recorded as loadavg_1m_before), and neither always runs first."""
    ok = [row for row in rows if row["export"].get("exit_code") == 0]
    for what in RUNTIMES[runtime].measurements:
        if what not in TIMED:
            for row in ok:
                row[what] = measure(runtime, ROOT / row["artifact"], what)
            continue
        rounds = {id(row): [] for row in ok}
        for r in range(SPEED_ROUNDS):
            for row in (ok if r % 2 == 0 else ok[::-1]):
                name = f"{Path(row['artifact']).name}.{what}.{r}"
                rounds[id(row)].append(measure(runtime, ROOT / row["artifact"], what, name))
        for row in ok:
            row[what] = combine_rounds(rounds[id(row)])


def combine_rounds(runs: list[dict]) -> dict:
    """One row from a measurement's rounds: rates are the median over the rounds that ran, peak RSS
    the largest; the last successful round's details, and every round's numbers under `rounds`."""
    good = [r for r in runs if r.get("exit_code") == 0 and "decode_tok_s" in r]
    if not good:
        return runs[-1]
    row = dict(good[-1])
    for key in ("prefill_tok_s", "decode_tok_s"):
        if all(isinstance(r.get(key), (int, float)) for r in good):
            row[key] = round(statistics.median(r[key] for r in good), 2)
    row["peak_rss_gib"] = max(r.get("peak_rss_gib") or 0 for r in good)
    row["rounds"] = [{k: r.get(k) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_gib", "loadavg_1m_before",
                                             "exit_code")} for r in runs]
    return row


def speed_source(ours: dict, peer: dict) -> str:
    """The LLM runner's numbers when it ran both artifacts, else the direct `forward` loop's."""
    ok = all((r.get("speed") or {}).get("exit_code") == 0 for r in (ours, peer))
    return "speed" if ok or not (ours.get("loop") and peer.get("loop")) else "loop"


def ratios(ours: dict, peer: dict) -> dict:
    """ours / peer for every number both rows have (for tok/s higher is better, else lower)."""
    src = speed_source(ours, peer)
    keys = {"prefill_tok_s": (src, "prefill_tok_s"), "decode_tok_s": (src, "decode_tok_s"),
            "peak_rss_gib": (src, "peak_rss_gib"), "model_file_mib": (None, "model_file_mib"),
            "perplexity": ("ppl", "perplexity")}
    out = {"speed_from": src}
    for name, (section, key) in keys.items():
        a = (ours.get(section) or {}).get(key) if section else ours.get(key)
        b = (peer.get(section) or {}).get(key) if section else peer.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[name] = round(a / b, 3)
    return out


def greedy_agreement(ours: dict, peer: dict) -> int | None:
    """How many of the 64 greedy tokens match before the two artifacts first disagree."""
    src = speed_source(ours, peer)
    a, b = (ours.get(src) or {}).get("greedy_tokens"), (peer.get(src) or {}).get("greedy_tokens")
    if not a or not b:
        return None
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def bench(runtime: str, recipe: str, reuse: bool) -> dict:
    rt = RUNTIMES[runtime]
    ours_dir, peer_dir = OUT / f"ours-{runtime}-{recipe}", OUT / f"peer-{runtime}-{recipe}"
    # both exports first, then the measurements: none of them runs beside an export
    ours = {"side": "ours", "recipe": OUR_RECIPE[recipe],
            **artifact_row(runtime, ours_dir, export_ours(runtime, recipe, ours_dir, reuse))}
    peer = {"side": "peer", "exporter": rt.peer, "recipe": rt.peer_quant[recipe],
            **artifact_row(runtime, peer_dir, export_peer(runtime, recipe, peer_dir, reuse))}
    measure_all(runtime, [ours, peer])
    return {"runtime": runtime, "recipe_class": recipe, "rows": [ours, peer],
            "ratios_ours_over_peer": ratios(ours, peer), "greedy_prefix_match": greedy_agreement(ours, peer),
            "fp32_reference": fp32_reference(ours_dir)}


def fp32_reference(artifact: Path) -> dict:
    """The fp32 PyTorch perplexity on the same tokens, measured once per run of this script."""
    cached = OUT / "fp32-reference.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    return measure("reference", artifact, "ppl", "fp32-reference")


def write(results: Path, doc: dict) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"runtimes-{doc['runtime']}-{doc['recipe_class']}.json"
    doc = {"benchmark": f"runtimes-{doc['runtime']}-{doc['recipe_class']}",
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "method": {"prompt_tokens": PROMPT, "new_tokens": NEW_TOKENS, "repeats": REPEATS,
                      "ppl_text": str(HELD_OUT.relative_to(ROOT)), "ppl_skip_tokens": SKIP,
                      "ppl_positions": POSITIONS, "ppl_chunk": CHUNK, "context": CONTEXT}, **doc}
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}", flush=True)
    return path


# ----------------------------------------------------------------------------------------------
# Measurement worker (child process): held-out tokens, then the runtime's own API
# ----------------------------------------------------------------------------------------------


def text_ids(artifact: Path) -> list[int]:
    """The held-out text as token ids (no <bos>), with the artifact's own tokenizer.json."""
    from gemma_export.loading.tokenizer import Tokenizer

    return Tokenizer(artifact / "tokenizer.json").encode(HELD_OUT.read_text(), bos=False)


def ppl_inputs(artifact: Path) -> tuple[list[int], list[int]]:
    """<bos> + the held-out slice: POSITIONS inputs and the POSITIONS tokens they predict."""
    from gemma_export.loading.tokenizer import Tokenizer

    held = text_ids(artifact)[SKIP:SKIP + POSITIONS]
    if len(held) < POSITIONS:
        raise SystemExit(f"{HELD_OUT}: fewer than {SKIP + POSITIONS} tokens")
    bos = Tokenizer(artifact / "tokenizer.json").bos_id
    return [bos, *held[:-1]], held


def nll_sum(logits, targets) -> float:
    """Sum of -log p(target) over rows of logits [T, V], in float64."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=-1)))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def teacher_forced_ppl(step, inputs: list[int], targets: list[int], chunk_len: int = CHUNK) -> dict:
    """Perplexity from `step(chunk, pos) -> logits [len(chunk), V]` called chunk_len tokens at a time."""
    import math

    total, t0 = 0.0, time.perf_counter()
    for pos in range(0, len(inputs), chunk_len):
        chunk = inputs[pos:pos + chunk_len]
        logits = step(chunk, pos)
        if logits.shape[0] != len(chunk):
            raise RuntimeError(f"runtime returned logits for {logits.shape[0]} of {len(chunk)} positions")
        total += nll_sum(logits, targets[pos:pos + len(chunk)])
    return {"perplexity": round(math.exp(total / len(targets)), 4), "positions": len(targets),
            "chunk": chunk_len, "ppl_seconds": round(time.perf_counter() - t0, 1)}


def summary(prefill: list[float], decode: list[float], tokens: list[int], prompt_tokens: int, load_s: float) -> dict:
    return {"prompt_tokens": prompt_tokens, "new_tokens": len(tokens), "repeats": len(prefill),
            "prefill_tok_s": round(statistics.median(prefill), 1), "decode_tok_s": round(statistics.median(decode), 1),
            "prefill_tok_s_runs": [round(v, 1) for v in prefill], "decode_tok_s_runs": [round(v, 1) for v in decode],
            "load_seconds": round(load_s, 2), "greedy_tokens": tokens}


# --- onnxruntime-genai ---------------------------------------------------------------------------


def genai_generator(model):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    # our global caches are the context long, so genai's buffers must be too; the same for the peer
    params.set_search_options(do_sample=False, max_length=CONTEXT)
    return og.Generator(model, params)


def genai_speed(artifact: Path) -> dict:
    """append_tokens(prompt) is the prefill; each generate_next_token after it is one decode step."""
    import numpy as np
    import onnxruntime_genai as og

    from gemma_export.loading.tokenizer import Tokenizer

    t0 = time.perf_counter()
    model = og.Model(str(artifact))
    load_s = time.perf_counter() - t0
    prompt = np.array([Tokenizer(artifact / "tokenizer.json").bos_id, *text_ids(artifact)[:PROMPT - 1]], np.int32)

    def once():
        gen = genai_generator(model)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        tokens = []
        while len(tokens) < NEW_TOKENS and not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), len(tokens) / (t2 - t1), tokens

    once()  # warm-up
    runs = [once() for _ in range(REPEATS)]
    return summary([r[0] for r in runs], [r[1] for r in runs], runs[-1][2], len(prompt), load_s)


def genai_ppl(artifact: Path) -> dict:
    """Teacher-forced: append_tokens a chunk, read get_output("logits") for its positions."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    gen = genai_generator(model)

    def step(chunk, pos):
        gen.append_tokens(np.array(chunk, np.int32))
        logits = np.asarray(gen.get_output("logits"))
        return logits.reshape(-1, logits.shape[-1])[-len(chunk):]

    return teacher_forced_ppl(step, *ppl_inputs(artifact))


# --- ExecuTorch ----------------------------------------------------------------------------------


def pte_files(artifact: Path) -> tuple[Path, Path | None]:
    """The program and its external weights (ours: model.pte + model.ptd; optimum: model.pte, and a
    .ptd if it wrote one)."""
    ptes, ptds = sorted(artifact.glob("*.pte")), sorted(artifact.glob("*.ptd"))
    if len(ptes) != 1 or len(ptds) > 1:
        raise SystemExit(f"{artifact}: expected one .pte and at most one .ptd, found {ptes + ptds}")
    return ptes[0], (ptds[0] if ptds else None)


def et_register_ops() -> None:
    """The quantized kernels and the LLM custom ops (SDPA, KV-cache update) both programs use;
    without them loading fails on missing operators."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


def et_speed(artifact: Path) -> dict:
    """TextLLMRunner.generate on a text that tokenizes to PROMPT tokens with its one <bos>; the
    rates come from the runner's own Stats (the numbers its PyTorchObserver line prints)."""
    et_register_ops()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from gemma_export.loading.tokenizer import Tokenizer

    pte, ptd = pte_files(artifact)
    tok = Tokenizer(artifact / "tokenizer.json")
    text = tok.decode(text_ids(artifact)[:PROMPT - 1])
    t0 = time.perf_counter()
    runner = TextLLMRunner(str(pte), str(artifact / "tokenizer.json"), *( [str(ptd)] if ptd else []))
    load_s = time.perf_counter() - t0

    def once():
        stats, pieces = [], []
        runner.reset()
        config = GenerationConfig(echo=False, max_new_tokens=NEW_TOKENS, seq_len=CONTEXT, temperature=0.0,
                                  num_bos=1, num_eos=0)
        runner.generate(text, config, token_callback=pieces.append, stats_callback=stats.append)
        s = stats[-1]
        prefill_ms = s.prompt_eval_end_ms - s.inference_start_ms
        decode_ms = s.inference_end_ms - s.prompt_eval_end_ms
        return (s.num_prompt_tokens / prefill_ms * 1000, s.num_generated_tokens / decode_ms * 1000,
                pieces, s.num_prompt_tokens)

    once()  # warm-up
    runs = [once() for _ in range(REPEATS)]
    pieces = runs[-1][2]
    # the runner streams text only: re-tokenize it to compare the greedy continuations
    tokens = tok.encode("".join(pieces), bos=False)
    row = summary([r[0] for r in runs], [r[1] for r in runs], tokens, runs[-1][3], load_s)
    row["new_tokens"] = len(pieces)
    row["greedy_text"] = "".join(pieces)
    return row


def et_forward(artifact: Path):
    """`forward(tokens [1, T], position)` through executorch.runtime, as `step(chunk, pos) -> logits
    [T, V]`, and the longest chunk it takes. Ours takes the chunk's first position ([1]);
    optimum's takes one per token ([T], `cache_position`); a program exported with static shapes
    takes one token per call. The inputs' (upper-bound) shapes say which."""
    import torch

    et_register_ops()
    from executorch.runtime import Runtime

    pte, ptd = pte_files(artifact)
    program = Runtime.get().load_program(str(pte), data_path=str(ptd) if ptd else None)
    forward = program.load_method("forward")
    meta = forward.metadata
    per_token = tuple(meta.input_tensor_meta(1).sizes()) != (1,)
    chunk_len = min(CHUNK, int(meta.input_tensor_meta(0).sizes()[1]))

    def step(chunk, pos):
        tokens = torch.tensor([chunk], dtype=torch.int64)
        where = (torch.arange(pos, pos + len(chunk), dtype=torch.int64) if per_token
                 else torch.tensor([pos], dtype=torch.int64))
        logits = forward.execute([tokens, where])[0]
        return logits.reshape(-1, logits.shape[-1])[-len(chunk):].float().numpy()

    return step, chunk_len


def et_loop(artifact: Path) -> dict:
    """Prefill and greedy decode by calling the program's `forward` directly (executorch.runtime),
    chunked as the program allows: the same work the LLM runner does, without the runner, so it
    still measures a program the runner cannot drive."""
    import numpy as np

    from gemma_export.loading.tokenizer import Tokenizer

    t0 = time.perf_counter()
    step, chunk_len = et_forward(artifact)
    load_s = time.perf_counter() - t0
    prompt = [Tokenizer(artifact / "tokenizer.json").bos_id, *text_ids(artifact)[:PROMPT - 1]]

    def once():
        t0 = time.perf_counter()
        for pos in range(0, len(prompt), chunk_len):
            logits = step(prompt[pos:pos + chunk_len], pos)
        t1 = time.perf_counter()
        tokens, pos = [int(np.argmax(logits[-1]))], len(prompt)
        while len(tokens) < NEW_TOKENS:
            tokens.append(int(np.argmax(step([tokens[-1]], pos)[-1])))
            pos += 1
        t2 = time.perf_counter()
        # the first new token comes from the prefill's logits: NEW_TOKENS - 1 decode calls
        return len(prompt) / (t1 - t0), (len(tokens) - 1) / (t2 - t1), tokens

    once()  # warm-up
    runs = [once() for _ in range(REPEATS)]
    row = summary([r[0] for r in runs], [r[1] for r in runs], runs[-1][2], len(prompt), load_s)
    row["prefill_chunk"] = chunk_len
    return row


def et_ppl(artifact: Path) -> dict:
    step, chunk_len = et_forward(artifact)
    return teacher_forced_ppl(step, *ppl_inputs(artifact), chunk_len)


def fp32_ppl(artifact: Path) -> dict:
    """The same perplexity from the fp32 PyTorch model (transformers, holding our weights): the
    floor both quantized artifacts are judged against. `artifact` only supplies the tokenizer."""
    import math

    import torch

    from gemma_export.gemma3.reference import hf_from_model, hf_logits
    from gemma_export.loading import ModelSpec, load

    inputs, targets = ppl_inputs(artifact)
    hf = hf_from_model(load(ModelSpec("gemma3-270m")).take_model())
    torch.set_num_threads(os.cpu_count() or 1)
    logits = hf_logits(hf, inputs).numpy()
    return {"perplexity": round(math.exp(nll_sum(logits, targets) / len(targets)), 4), "positions": len(targets),
            "model": "fp32 PyTorch (transformers Gemma3ForCausalLM with our weights)"}


# --- LiteRT-LM -----------------------------------------------------------------------------------


def litertlm_engine(artifact: Path, cache_dir: str):
    import litert_lm as lm

    bundles = sorted(artifact.glob("*.litertlm"))
    if len(bundles) != 1:
        raise SystemExit(f"{artifact}: expected one .litertlm bundle, found {len(bundles)}")
    lm.set_min_log_severity(lm.LogSeverity.ERROR)
    # full context on both sides: our global caches are CONTEXT long, and so is the peer's cache
    return lm.Engine(str(bundles[0]), backend=lm.Backend.CPU(thread_count=os.cpu_count()),
                     max_num_tokens=CONTEXT, cache_dir=cache_dir, enable_benchmark=True)


def litertlm_speed(artifact: Path) -> dict:
    """run_prefill(text) then run_decode() (greedy, 64 new tokens); rates and token counts are the
    engine's own benchmark info. The engine tokenizes (and adds <bos>): the prompt is the held-out
    text's first tokens as text, the same string for both artifacts."""
    import tempfile

    import litert_lm as lm

    from gemma_export.loading.tokenizer import Tokenizer

    text = Tokenizer(artifact / "tokenizer.json").decode(text_ids(artifact)[:PROMPT - 1])
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        engine = litertlm_engine(artifact, cache)
        load_s = time.perf_counter() - t0

        def once():
            session = engine.create_session(apply_prompt_template=False, max_output_tokens=NEW_TOKENS,
                                            sampler_config=lm.SamplerConfig(top_k=1, temperature=0.0))
            session.run_prefill([text])
            reply = session.run_decode()
            info = session.get_benchmark_info()
            session.close()
            reply = reply.texts[0] if reply.texts else ""
            return (info.last_prefill_tokens_per_second, info.last_decode_tokens_per_second,
                    info.last_prefill_token_count, engine.tokenize(reply))

        once()  # warm-up (the first run also packs XNNPACK's weights into the cache folder)
        runs = [once() for _ in range(REPEATS)]
        engine.close()
    return summary([r[0] for r in runs], [r[1] for r in runs], list(runs[-1][3]), runs[-1][2], load_s)


def litertlm_ppl(artifact: Path) -> dict:
    """Perplexity from the engine's own scoring of the held-out slice (as text) in a fresh session:
    the per-token log-likelihoods it returns, over its own tokenization of the text."""
    import math
    import tempfile

    from gemma_export.loading.tokenizer import Tokenizer

    _, held = ppl_inputs(artifact)
    text = Tokenizer(artifact / "tokenizer.json").decode(held)
    with tempfile.TemporaryDirectory() as cache:
        engine = litertlm_engine(artifact, cache)
        session = engine.create_session(apply_prompt_template=False)
        t0 = time.perf_counter()
        scored = session.run_text_scoring([text], store_token_lengths=True)
        seconds = time.perf_counter() - t0
        session.close()
        engine.close()
    logp = list(scored.token_scores[0]) if scored.token_scores else []
    if not logp:
        raise SystemExit("LiteRT-LM returned no per-token scores")
    return {"perplexity": round(math.exp(-sum(logp) / len(logp)), 4), "positions": len(logp),
            "score": float(scored.scores[0]) if scored.scores else None,
            "token_lengths": list(scored.token_lengths), "ppl_seconds": round(seconds, 1),
            "method": "litert_lm Session.run_text_scoring (per-token log-likelihoods)"}


WORKERS = {("litert-lm", "speed"): litertlm_speed, ("litert-lm", "ppl"): litertlm_ppl,
           ("ort-genai", "speed"): genai_speed, ("ort-genai", "ppl"): genai_ppl,
           ("executorch", "speed"): et_speed, ("executorch", "loop"): et_loop, ("executorch", "ppl"): et_ppl, ("reference", "ppl"): fp32_ppl}


def worker(argv) -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.runtimes measure")
    ap.add_argument("runtime", choices=[*sorted(RUNTIMES), "reference"])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("what", choices=["speed", "loop", "ppl"])
    ap.add_argument("json_out", type=Path)
    args = ap.parse_args(argv)
    result = WORKERS[(args.runtime, args.what)](args.artifact)
    args.json_out.write_text(json.dumps(result, indent=2))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["measure"]:
        return worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", default="ort-genai,executorch,litert-lm")
    ap.add_argument("--recipes", default="int4,int8")
    ap.add_argument("--reuse-exports", action="store_true",
                    help="measure artifacts already exported under out/bench-runtimes/ (and their export record)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON results")
    args = ap.parse_args(argv)
    for runtime in args.runtimes.split(","):
        for recipe in args.recipes.split(","):
            write(args.results, bench(runtime, recipe, args.reuse_exports))


if __name__ == "__main__":
    main()
