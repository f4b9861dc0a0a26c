"""TFLite / LiteRT (through litert-torch): signatures `prefill_<T>` and `decode` in one file.

The KV cache is passed as signature inputs `k_cache_{i}`/`v_cache_{i}` and returned as
`..._out`, sized per layer type (window-sized on local layers). Both signatures share one copy of
the weights. The runtime session uses LiteRT's CompiledModel with two sets of cache buffers that
swap roles each step, so the cache is never copied through Python.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch

from converters import check_recipe
from gemma_export.errors import ArtifactError, UnsupportedError
from gemma_export.session import SessionInfo, check_room
from gemma_export.trace import CacheIO, cache_names, describe_io, sample_inputs

FORMAT = "tflite"
FILE = "model.tflite"
DECODE = "decode"


def prefill_name(t: int) -> str:
    return f"prefill_{t}"


def hidden_name(t: int) -> str:
    return f"hidden_{t}"  # debug signature: residual stream per layer (verify --locate)


class _Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.names = cache_names(model.cfg.num_layers)

    def forward(self, tokens, pos, length, **caches):
        _, _, hidden = self.model.step(tokens, pos, length, [caches[n] for n in self.names], hidden=True)
        return {"hidden_states": hidden}


def check(request) -> None:
    check_recipe(FORMAT, request)


def export(model, request, workdir: Path, progress) -> dict:
    import litert_torch

    from gemma_export.quantize import float_twin

    codes = float_twin(model, activation_ops=False)  # the runtime's kernels quantize activations
    t = request.prefill_len
    prefill_inputs = sample_inputs(model, t, decode=False)
    decode_inputs = sample_inputs(model, 1, decode=True)
    prefill, decode = CacheIO(model, decode=False).eval(), CacheIO(model, decode=True).eval()
    progress(f"litert-torch conversion (signatures {prefill_name(t)}, {DECODE}; lightweight)")
    with torch.no_grad():
        sigs = (
            litert_torch.signature(prefill_name(t), prefill, sample_kwargs=prefill_inputs)
            .signature(DECODE, decode, sample_kwargs=decode_inputs)
        )
        if request.debug_outputs:
            sigs = sigs.signature(hidden_name(t), _Hidden(model).eval(), sample_kwargs=prefill_inputs)
        edge = (
            sigs
            # lightweight conversion keeps memory down for 1B+; its default runtime constant
            # folding writes constants the interpreter rejects ("Tensor N is invalidly
            # specified in schema"), so it is turned off.
            .convert(lightweight_conversion=True, runtime_constant_folding=False)
        )
        progress("writing .tflite")
        edge.export(str(workdir / FILE))
    del edge
    gc.collect()
    quantized = []
    if codes:
        from converters.tflite_codes import quantize_file

        quantized = quantize_file(workdir / FILE, codes, progress)

    def outputs(inputs, t_):
        names = cache_names(model.cfg.num_layers)
        shapes = dict(zip(names, model.cache_shapes()))
        outs = {"logits": torch.zeros(1, t_, model.cfg.vocab_size)}
        outs.update({f"{n}_out": torch.zeros(shapes[n]) for n in names})
        return describe_io(inputs, outs)

    return {
        "entry_points": {
            prefill_name(t): outputs(prefill_inputs, t),
            DECODE: outputs(decode_inputs, 1),
        },
        "program": {"file": FILE,
                    "signatures": [prefill_name(t), DECODE] + ([hidden_name(t)] if request.debug_outputs else []),
                    "kv_cache": "signature inputs -> outputs", "quantized_weights": quantized},
        "versions": _versions(),
    }


def _versions():
    from gemma_export.package import versions

    return versions("litert-torch", "ai-edge-litert", "ai-edge-quantizer")


class TfliteSession:
    def __init__(self, folder: Path, manifest: dict, threads: int):
        from ai_edge_litert.compiled_model import CompiledModel

        path = folder / manifest["program"]["file"]
        try:
            self._cm = CompiledModel.from_file(str(path))
        except Exception as e:
            raise ArtifactError(f"{path}: LiteRT could not load the model ({str(e).splitlines()[0]})") from None
        cfg = manifest["model"]["config"]
        self.info = SessionInfo(manifest["prefill_len"], manifest["max_context"], cfg["vocab_size"], manifest["window"])
        self._prefill = prefill_name(self.info.prefill_len)
        self._signatures = manifest["program"]["signatures"]
        self._names = cache_names(cfg["num_layers"])
        self._layers, self._hidden = cfg["num_layers"], cfg["hidden_size"]
        self._shapes = {e["name"]: e["shape"] for e in manifest["entry_points"][DECODE]["inputs"]}
        cm = self._cm
        # Two cache sets; each step reads one and writes the other, then they swap.
        self._a = {n: cm.create_input_buffer_by_name(DECODE, n) for n in self._names}
        self._b = {n: cm.create_output_buffer_by_name(DECODE, f"{n}_out") for n in self._names}
        self._io = {}
        for sig in (self._prefill, DECODE):
            ins = {k: cm.create_input_buffer_by_name(sig, k) for k in ("tokens", "pos", "length") if k != "length" or sig != DECODE}
            self._io[sig] = (ins, cm.create_output_buffer_by_name(sig, "logits"))
        self.reset()

    def reset(self) -> None:
        for n in self._names:
            self._a[n].write(np.zeros(self._shapes[n], dtype=np.float32))

    def _run(self, sig: str, tokens: np.ndarray, pos: int, n: int) -> np.ndarray:
        ins, logits = self._io[sig]
        ins["tokens"].write(tokens)
        ins["pos"].write(np.array([pos], dtype=np.int32))
        if "length" in ins:
            ins["length"].write(np.array([n], dtype=np.int32))
        outs = {"logits": logits, **{f"{k}_out": self._b[k] for k in self._names}}
        self._cm.run_by_name(sig, {**ins, **self._a}, outs)
        self._a, self._b = self._b, self._a
        t, v = tokens.shape[1], self.info.vocab_size
        return logits.read(t * v, np.float32).reshape(t, v)

    def prefill(self, tokens, pos: int) -> np.ndarray:
        n = len(tokens)
        check_room(self.info, pos, n)
        padded = np.zeros((1, self.info.prefill_len), dtype=np.int32)
        padded[0, :n] = tokens
        return self._run(self._prefill, padded, pos, n)[:n]

    def decode(self, token: int, pos: int) -> np.ndarray:
        check_room(self.info, pos, 1)
        return self._run(DECODE, np.array([[token]], dtype=np.int32), pos, 1)[0]

    def hidden_states(self, tokens) -> np.ndarray:
        n = len(tokens)
        check_room(self.info, 0, n)
        sig, cm = hidden_name(self.info.prefill_len), self._cm
        if sig not in self._signatures:
            raise UnsupportedError("this artifact was exported with --no-debug-outputs; re-export it to locate")
        ins = {k: cm.create_input_buffer_by_name(sig, k) for k in ("tokens", "pos", "length")}
        padded = np.zeros((1, self.info.prefill_len), dtype=np.int32)
        padded[0, :n] = tokens
        ins["tokens"].write(padded)
        ins["pos"].write(np.zeros(1, dtype=np.int32))
        ins["length"].write(np.array([n], dtype=np.int32))
        zeros = {k: cm.create_input_buffer_by_name(sig, k) for k in self._names}
        for k, buf in zeros.items():
            buf.write(np.zeros(self._shapes[k], dtype=np.float32))
        out = cm.create_output_buffer_by_name(sig, "hidden_states")
        cm.run_by_name(sig, {**ins, **zeros}, {"hidden_states": out})
        layers, hid = self._layers + 1, self._hidden
        return out.read(layers * self.info.prefill_len * hid, np.float32).reshape(layers, -1, hid)[:, :n]


def open(folder: Path, manifest: dict, threads: int) -> TfliteSession:  # noqa: A001 - protocol name
    return TfliteSession(folder, manifest, threads)
