"""llama.cpp as the speed peer: the bundled GGUF (Q4_K_M) through llama-cpp-python.

The same loop as our sessions in `benchmarks.run --only speed`: the same prompt ids prefilled in
one batch, then greedy decode one token at a time (argmax of the logits in numpy on both sides),
on the same number of threads. llama-cpp-python is built from source by `make bench`, with the
instruction sets this CPU reports (benchmarks/llamacpp_flags.py).
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time

import numpy as np

try:
    import llama_cpp
except ImportError:  # built by `make bench`; load() says how
    llama_cpp = None

from gemma_export.errors import UnsupportedError
from gemma_export.loading import bundled_gguf

from benchmarks.llamacpp_flags import build_flags

_PROBE = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False); "
          "llm.eval([2])")


def _rebuild() -> str:
    return (f'CMAKE_ARGS="{build_flags()}" pip install --no-cache-dir --force-reinstall --no-deps '
            "llama-cpp-python")


@functools.cache
def _check_build() -> None:
    """A build for another CPU dies with an illegal instruction on its first evaluation, taking the
    process with it: try one in a child first."""
    done = subprocess.run([sys.executable, "-c", _PROBE, str(bundled_gguf())], capture_output=True, text=True)
    if done.returncode == -signal.SIGILL:
        raise UnsupportedError(f"llama-cpp-python was built for another CPU (illegal instruction); rebuild it: {_rebuild()}")
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise UnsupportedError(f"llama-cpp-python could not evaluate the bundled GGUF: {lines[-1]}")


def load(threads: int, context: int, batch: int = 512):
    if llama_cpp is None:
        raise UnsupportedError(f"llama-cpp-python is not installed: `make bench` builds it ({_rebuild()})")
    _check_build()
    return llama_cpp.Llama(model_path=str(bundled_gguf()), n_ctx=context, n_batch=batch, n_ubatch=batch,
                 n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)


def _last_logits(llm) -> np.ndarray:
    """The last evaluated token's logits, read in place (Llama.scores is filled only with
    logits_all, which would make llama.cpp compute the head for every prompt token)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def speed(ids: list[int], new_tokens: int, threads: int, repeats: int, context: int) -> dict:
    """Median prefill and decode tokens/s over `repeats` runs, and the greedy tokens of the last.
    `context`: the cache it allocates, as our artifacts' (it attends over the cells in use)."""
    llm = load(threads, context, max(512, len(ids)))
    llm.reset()
    llm.eval(ids)  # warm-up
    prefill, decode, tokens = [], [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tok = int(np.argmax(_last_logits(llm)))
        tokens = [tok]
        for _ in range(new_tokens):
            llm.eval([tok])
            tok = int(np.argmax(_last_logits(llm)))
            tokens.append(tok)
        t2 = time.perf_counter()
        prefill.append(len(ids) / (t1 - t0))
        decode.append(new_tokens / (t2 - t1))
    return {"format": "llama.cpp", "recipe": "Q4_K_M (bundled GGUF)", "runtime": f"llama-cpp-python {llama_cpp.__version__}",
            "threads": threads, "context": context, "prompt_tokens": len(ids), "new_tokens": new_tokens, "repeats": repeats,
            "prefill_tok_s": round(float(np.median(prefill)), 1), "decode_tok_s": round(float(np.median(decode)), 1),
            "prefill_tok_s_runs": [round(v, 1) for v in prefill], "decode_tok_s_runs": [round(v, 1) for v in decode],
            "greedy_tokens": tokens[:16], "note": "llama.cpp's own Q4_K_M codes: its tokens need not equal ours"}
