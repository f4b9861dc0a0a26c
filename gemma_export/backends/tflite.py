"""TFLite / LiteRT (through litert-torch): signatures `prefill_<T>` and `decode` in one file.

The KV cache is passed as signature inputs `k_cache_{i}`/`v_cache_{i}` and returned as
`..._out`, sized per layer type (window-sized on local layers). Both signatures share one copy of
the weights. Quantized recipes convert the float twin and then get the PyTorch codes written into
the file (`tflite_codes`). The runtime session uses LiteRT's CompiledModel with two sets of cache
buffers that swap roles each step, so the cache is never copied through Python.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch

from ..artifact import Manifest, versions
from ..errors import ArtifactError, UnsupportedError
from ..session import BaseSession
from ..trace import DECODE, HIDDEN, CacheIO, cache_names, describe_io, float_twin, sample_inputs, sample_outputs
from . import tflite_codes
from .base import Exported, Lowering, Runner, require, session_info

FILE = "model.tflite"


def prefill_name(t: int) -> str:
    return f"prefill_{t}"


def hidden_name(t: int) -> str:
    return f"hidden_{t}"  # debug signature: residual stream per layer (verify --locate)


class TfliteBackend:
    name = "tflite"
    # dynamic-range kernels (XNNPACK): int8 per channel or int4 blocks, activations quantized by
    # the kernel; one weight scheme for the whole model
    lowering = Lowering(frozenset({(8, "channel"), (4, "block")}), frozenset({"int8-dynamic"}), uniform=True)
    runner = Runner("GEMMA_TFLITE_RUNNER",
                    "a binary linked with LiteRT that runs the signatures `prefill_<T>` and `decode`\n"
                    "of the .tflite, passing the k/v caches from each call to the next")

    def export(self, model, job, workdir: Path, progress, vocab) -> Exported:
        litert_torch = require("litert_torch", self.name)
        codes = float_twin(model, activation_ops=False)  # the runtime's kernels quantize activations
        t = job.prefill_len
        prefill_inputs = sample_inputs(model, t, decode=False)
        decode_inputs = sample_inputs(model, 1, decode=True)
        progress(f"litert-torch conversion (signatures {prefill_name(t)}, {DECODE}; lightweight)")
        with torch.no_grad():
            sigs = (litert_torch.signature(prefill_name(t), CacheIO(model, decode=False).eval(),
                                           sample_kwargs=prefill_inputs)
                    .signature(DECODE, CacheIO(model, decode=True).eval(), sample_kwargs=decode_inputs))
            if job.debug_outputs:
                sigs = sigs.signature(hidden_name(t), CacheIO(model, decode=False, hidden=True, logits=False).eval(),
                                      sample_kwargs=prefill_inputs)
            # lightweight conversion keeps memory down for 1B+; its default runtime constant folding
            # writes constants the interpreter rejects ("Tensor N is invalidly specified in
            # schema"), so it is turned off.
            edge = sigs.convert(lightweight_conversion=True, runtime_constant_folding=False)
            progress("writing .tflite")
            edge.export(str(workdir / FILE))
        del edge
        gc.collect()
        quantized = []
        if codes:
            quantized = tflite_codes.quantize_file(workdir / FILE, codes, progress)
        return Exported(
            entry_points={prefill_name(t): describe_io(prefill_inputs, sample_outputs(model, t)),
                          DECODE: describe_io(decode_inputs, sample_outputs(model, 1))},
            program={"file": FILE,
                     "signatures": [prefill_name(t), DECODE] + ([hidden_name(t)] if job.debug_outputs else []),
                     "kv_cache": "signature inputs -> outputs", "quantized_weights": quantized},
            versions=versions("litert-torch", "ai-edge-litert", "ai-edge-quantizer"))

    def open(self, folder: Path, manifest: Manifest, threads: int) -> "TfliteSession":
        return TfliteSession(folder, manifest, threads)

    def read_codes(self, folder: Path, manifest: Manifest) -> list[np.ndarray]:
        """The codes int8 [out, in] of every integer weight in the file (first signature)."""
        return list(tflite_codes.read_codes(folder / manifest.program["file"]).values())

    def stock_generate(self, folder: Path, manifest: Manifest, text: str, max_new_tokens: int) -> None:
        return None


BACKEND = TfliteBackend()


class TfliteSession(BaseSession):
    def __init__(self, folder: Path, manifest: Manifest, threads: int):
        compiled = require("ai_edge_litert.compiled_model", "tflite")
        path = folder / manifest.program["file"]
        try:
            self._cm = compiled.CompiledModel.from_file(str(path))
        except Exception as e:
            raise ArtifactError(f"{path}: LiteRT could not load the model ({str(e).splitlines()[0]})") from None
        self.info = session_info(manifest)
        self._prefill = prefill_name(self.info.prefill_len)
        self._signatures = manifest.program["signatures"]
        self._names = cache_names(manifest.num_layers)
        self._hidden_width = manifest.hidden_size
        self._shapes = {e["name"]: e["shape"] for e in manifest.entry_points[DECODE]["inputs"]}
        cm = self._cm
        # Two cache sets; each step reads one and writes the other, then they swap.
        self._a = {n: cm.create_input_buffer_by_name(DECODE, n) for n in self._names}
        self._b = {n: cm.create_output_buffer_by_name(DECODE, f"{n}_out") for n in self._names}
        self._io = {}
        for sig in (self._prefill, DECODE):
            keys = ("tokens", "pos") if sig == DECODE else ("tokens", "pos", "length")
            ins = {k: cm.create_input_buffer_by_name(sig, k) for k in keys}
            self._io[sig] = (ins, cm.create_output_buffer_by_name(sig, "logits"))
        self.reset()

    def reset(self) -> None:
        for n in self._names:
            self._a[n].write(np.zeros(self._shapes[n], dtype=np.float32))

    def _run(self, tokens, pos, n, decode):
        sig = DECODE if decode else self._prefill
        ins, logits = self._io[sig]
        _write_step(ins, tokens, pos, n)
        outs = {"logits": logits, **{f"{k}_out": self._b[k] for k in self._names}}
        self._cm.run_by_name(sig, {**ins, **self._a}, outs)
        self._a, self._b = self._b, self._a
        t, v = tokens.shape[1], self.info.vocab_size
        return logits.read(t * v, np.float32).reshape(t, v)

    def _hidden(self, tokens, n):
        sig, cm = hidden_name(self.info.prefill_len), self._cm
        if sig not in self._signatures:
            raise UnsupportedError("this artifact was exported with --no-debug-outputs; re-export it to locate")
        ins = {k: cm.create_input_buffer_by_name(sig, k) for k in ("tokens", "pos", "length")}
        _write_step(ins, tokens, 0, n)
        zeros = {k: cm.create_input_buffer_by_name(sig, k) for k in self._names}
        for k, buf in zeros.items():
            buf.write(np.zeros(self._shapes[k], dtype=np.float32))
        out = cm.create_output_buffer_by_name(sig, HIDDEN)
        cm.run_by_name(sig, {**ins, **zeros}, {HIDDEN: out})
        layers, t = len(self._names) // 2 + 1, tokens.shape[1]
        return out.read(layers * t * self._hidden_width, np.float32).reshape(layers, t, self._hidden_width)


def _write_step(ins: dict, tokens: np.ndarray, pos: int, n: int) -> None:
    ins["tokens"].write(tokens)
    ins["pos"].write(np.array([pos], dtype=np.int32))
    if "length" in ins:
        ins["length"].write(np.array([n], dtype=np.int32))
