"""qnn: Qualcomm Hexagon (HTP) NPU artifacts, compiled ahead of time for named Snapdragon SoCs.

What an NPU takes, and so what this target writes:
- static shapes: a prefill graph of exactly `prefill_len` tokens and a decode graph of one token,
  the KV caches passed in and out as tensors (the model's sliding caches: window-sized local
  layers, the context for global ones);
- static activation quantization: onnxruntime's QDQ quantizer calibrates a per-tensor range for
  every activation on the recipe's calibration text (the bundled multilingual corpus), at the
  recipe's activation width (16 bits for `a16w8`, 8 for `a8w8`); weights are int8 per channel,
  the recipe's own codes (re-quantizing our dequantized weights at max|w|/127 gives them back,
  which `read_codes` lets the bit-exact test check); the `fp16` recipe runs the float graph in fp16
  on the HTP, traced with the residual stream scaled down and overflow-safe norms (npu_forms);
- a graph compiled for one SoC: onnxruntime's QNN execution provider, with CPU fallback
  disabled, compiles each graph into a QNN context binary and an EPContext model that points at
  it (`<graph>_<SOC>.onnx` + `<graph>_<SOC>_qnn.bin`), one pair per graph and SoC.

The QDQ graphs stay in the artifact: they are the recipe simulated exactly on the CPU (the same
quantize/dequantize steps as float operators), so `verify` can tell a quantization loss from a
compiler's, and `verify --locate` compiles the prefill graph again with the residual stream as extra
outputs to say at which layer. Everything runs here on the x86-64 HTP emulator that the
onnxruntime-qnn wheel bundles.
"""

from __future__ import annotations

import ast
import os
import re
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import quiet
from ..errors import ArtifactError, ExportError, UnsupportedError
from ..gemma3 import family
from ..gemma3.model import RESIDUAL_SCALE, npu_forms
from ..quant.calibrate import calibration_set
from ..quant.recipes import resolve
from ..session import BaseSession
from ..loading.tokenizer import Tokenizer
from ..trace import DECODE, PREFILL, CacheIO, cache_names, describe_io, float_twin, release_weights, sample_inputs
from . import onnx as onnx_format
from .base import Exported, Lowering, Runner, match_weights, require, session_info

OPSET = 23  # RMSNormalization
MASK = -100.0  # a masked score's offset: exp(-100) is 0 in fp16 and fp32, and the range stays resolvable
GRAPHS = {PREFILL: "prefill.onnx", DECODE: "decode.onnx"}
CALIBRATION_SEQUENCES = 8  # of the recipe's calibration set, evenly spread over its languages
CALIBRATION_DECODES = 16  # decode steps calibrated per sequence (see _decode_positions)


@dataclass(frozen=True)
class Soc:
    """A Snapdragon SoC as QNN's HTP backend names it: the HTP architecture and the SoC model id."""

    name: str
    htp_arch: str
    soc_model: str

    def options(self, backend_path: str) -> dict:
        return {"backend_path": backend_path, "htp_arch": self.htp_arch, "soc_model": self.soc_model}


SOCS = {s.name: s for s in (Soc("SM8550", "73", "43"), Soc("SM8650", "75", "57"), Soc("SM8750", "79", "69"))}


def soc(name: str) -> Soc:
    try:
        return SOCS[name.upper()]
    except KeyError:
        raise UnsupportedError(f"unknown SoC {name!r}; the qnn target compiles for {', '.join(SOCS)}") from None


def compiled_file(graph: str, soc_name: str) -> str:
    return f"{Path(graph).stem}_{soc_name}.onnx"


def _binary(ctx: str) -> str:
    return f"{Path(ctx).stem}_qnn.bin"  # the name onnxruntime gives the context binary beside its EPContext model


# ----------------------------------------------------------------------------------------------
# The emulator
# ----------------------------------------------------------------------------------------------

_REGISTERED = []


def _qnn(backend: str = "qnn"):
    """onnxruntime with the QNN execution provider registered; returns (ort, devices, HTP library)."""
    ort = require("onnxruntime", backend)
    qnn = require("onnxruntime_qnn", backend)
    library = qnn.get_library_path()
    if not _REGISTERED:
        ort.register_execution_provider_library("QNNExecutionProvider", library)
        _REGISTERED.append(library)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise UnsupportedError("onnxruntime-qnn is installed but offers no QNN device")
    return ort, devices, os.path.join(os.path.dirname(library), "libQnnHtp.so")


def htp_session(path, chip: Soc, fallback: bool = False, context: Path | None = None):
    """An onnxruntime session whose graph runs on the emulated HTP of `chip`; with `context`, the
    compiled EPContext model is written there. Without `fallback`, a node the HTP cannot take
    fails the session instead of running on the CPU. `path` a model file, or (bytes, the folder of
    its external data)."""
    ort, devices, htp = _qnn()
    so = ort.SessionOptions()
    path = _model(so, path)
    so.log_severity_level = 3
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context))
        so.add_session_config_entry("ep.context_embed_mode", "0")
    so.add_provider_for_devices(devices, chip.options(htp))
    with quiet.native_stdout():  # not into --json output
        return ort.InferenceSession(path, sess_options=so)


def cpu_session(path, threads: int = 0):
    ort = require("onnxruntime", "qnn")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    path = _model(so, path)
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def _model(so, path):
    """What InferenceSession takes for a model file or (bytes, external data folder)."""
    if isinstance(path, tuple):
        data, folder = path
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        return data
    return str(path)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


class QnnBackend:
    name = "qnn"
    # int8 or int4 weights per channel under static activations; every linear and the table are quantized
    # together, as onnxruntime's QDQ quantizer does. Floats run in fp16 on the HTP
    lowering = Lowering(frozenset({(8, "channel"), (4, "channel")}), frozenset({"int8-static", "int16-static"}),
                        complete=True,
                        float_compute=frozenset({"fp16"}))
    runner = Runner("GEMMA_QNN_RUNNER",
                    "onnxruntime for Android built with the QNN execution provider (libonnxruntime.so,\n"
                    "libQnnHtp.so and the HTP skel library of the phone's SoC), loading the EPContext model\n"
                    "<graph>_<SOC>.onnx, which names its context binary beside it; or the QNN SDK's\n"
                    "qnn-net-run with --retrieve_context on <graph>_<SOC>_qnn.bin")
    images = False

    def check(self, job) -> None:
        """Refuse an unknown SoC or a missing emulator before any work."""
        if not job.socs:
            raise UnsupportedError("format qnn needs at least one --soc")
        for name in job.socs:
            soc(name)
        _qnn(self.name)

    def export(self, model, job, workdir: Path, progress, vocab, vision=None) -> Exported:
        chips = [soc(n) for n in job.socs]
        codes = float_twin(model, activation_ops=False)  # the QDQ graph quantizes activations itself
        if codes:
            _untie(model)
        schemes = {s.activations for _, _, s, _ in codes.values()}
        if len(schemes) > 1:
            raise UnsupportedError(f"format qnn takes one activation width for the whole graph, the recipe has {sorted(schemes)}")
        # the lowering admits static activations, or floats (fp16 on the HTP: bits None)
        bits = (16 if schemes.pop() == "int16-static" else 8) if schemes else None
        weights = min((s.bits for _, _, s, _ in codes.values()), default=8)  # a16w4: the table stays int8
        entry_points, report, calibration = {}, {"socs": {}}, None
        with tempfile.TemporaryDirectory(dir=workdir.parent, prefix=".qnn-float-") as tmp:
            floats = {}
            for entry, file in GRAPHS.items():
                decode = entry == DECODE
                t = 1 if decode else job.prefill_len
                progress(f"tracing the {entry} graph ({t} token{'s' if t > 1 else ''}, static shapes, opset {OPSET})")
                floats[entry] = workdir / file if bits is None else Path(tmp) / file
                entry_points[entry] = {"graph": file, **_trace(model, t, decode, floats[entry], fp16=bits is None)}
            if bits is not None:
                data, digest = calibration_set(resolve(job.recipe), Tokenizer(vocab.path), model.max_context)
                sequences = data[::max(1, len(data) // CALIBRATION_SEQUENCES)][:CALIBRATION_SEQUENCES]
                for entry, file in GRAPHS.items():
                    progress(f"quantizing the {entry} graph: a{bits}w{weights} QDQ, activation ranges from "
                             f"{len(sequences)} calibration sequences (min/max)")
                    feeds = _Feeds(model, sequences, job.prefill_len, entry == DECODE)
                    _quantize(floats[entry], workdir / file, feeds, bits, codes)
                    _check_codes(workdir / file, codes)
                calibration = {"method": "minmax", "sequences": len(sequences),
                               "tokens": [len(ids) for ids in sequences],
                               "decode_steps": "after the first prefill chunk and at the end of each sequence, "
                                               f"{CALIBRATION_DECODES} per sequence",
                               "set_sha256": digest, "activation_bits": bits,
                               "weights": "the recipe's codes, symmetric per channel (int4 or int8)"}
            release_weights(model)
        for chip in chips:
            report["socs"][chip.name] = {}
            for entry, file in GRAPHS.items():
                progress(f"compiling the {entry} graph for {chip.name} (HTP v{chip.htp_arch}, CPU fallback disabled)")
                report["socs"][chip.name][entry] = _compile(workdir / file, workdir, chip)
        program = {"file": GRAPHS[DECODE], "external_data": GRAPHS[DECODE] + ".data", "opset": OPSET,
                   "graphs": dict(GRAPHS), "socs": [c.name for c in chips], "mask_value": MASK,
                   "precision": "fp16" if bits is None else f"a{bits}w{weights}",
                   "residual_scale": RESIDUAL_SCALE if bits is None else 1.0,
                   "calibration": calibration, "compile": report}
        ort = require("onnxruntime", self.name)
        return Exported(entry_points, program, {"onnxruntime": ort.__version__, "onnxruntime-qnn": _qnn_version()})

    def open(self, folder: Path, manifest, threads: int) -> "QnnSession":
        return QnnSession(folder, manifest)

    def simulated(self, folder: Path, manifest, threads: int) -> "QnnSession":
        """The QDQ graphs on onnxruntime's CPU provider: the recipe as the NPU should compute it,
        without the compiler (verify reports the artifact against it)."""
        return QnnSession(folder, manifest, simulated=True, threads=threads)

    def read_codes(self, folder: Path, manifest) -> list[np.ndarray]:
        onnx = require("onnx", self.name)
        from onnx import numpy_helper

        out = []
        for file in manifest.program["graphs"].values():
            graph = onnx.load(str(folder / file)).graph
            dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
            out += [numpy_helper.to_array(i).astype(np.int8) for i in graph.initializer
                    if i.name in dequantized and i.data_type in _CODE_TYPES]
        return out

    def declared_io(self, folder: Path, manifest) -> dict[str, dict]:
        return onnx_format.BACKEND.declared_io(folder, manifest)  # ONNX graphs, named per entry point likewise

    def stock_generate(self, folder: Path, manifest, text: str, max_new_tokens: int):
        raise UnsupportedError("format qnn has no stock LLM runtime here: its context binaries run on a phone's "
                               "HTP (or this machine's emulator, through `gemma-export verify`)")


def _qnn_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-qnn")


def _trace(model, t: int, decode: bool, path: Path, fp16: bool) -> dict:
    """One static-shape step graph with the caches as inputs and outputs: its described I/O."""
    step = CacheIO(model, decode)
    inputs = sample_inputs(model, t, decode)
    with npu_forms(model, MASK, fp16), torch.no_grad():
        outputs = step(**inputs)
        program = torch.onnx.export(step, (), kwargs=inputs, input_names=list(inputs), output_names=list(outputs),
                                    dynamo=True, opset_version=OPSET, optimize=True, verbose=False)
    program.save(str(path), external_data=True)
    return describe_io(inputs, outputs)


def _untie(model) -> None:
    """The head gets its own copy of the tied table: the HTP takes a per-channel int8 weight in a
    MatMul (the head keeps the recipe's codes) but not a per-row gather, so the gathered table is
    left to the QDQ quantizer (16 bits per tensor under a16w8)."""
    head, table = getattr(model, family.HEAD), getattr(model, family.TABLE)
    if head.weight is table.weight:
        head.weight = torch.nn.Parameter(table.weight.detach().clone(), requires_grad=False)


class _Feeds:
    """onnxruntime's calibration reader: graph inputs made on demand by running the PyTorch model
    through the calibration sequences (prefill chunks; for the decode graph, decode steps right
    after the first chunk and at the end of each sequence, so both early and late positions are
    seen), so one step's caches are in memory at a time."""

    def __init__(self, model, sequences: list[list[int]], prefill_len: int, decode: bool):
        self._it = self._steps(model, sequences, prefill_len, decode)
        self._count = (sum(len(_decode_positions(len(ids), prefill_len)) for ids in sequences) if decode
                       else sum(-(-len(ids) // prefill_len) for ids in sequences))
        self._left = self._count

    # onnxruntime's strided calibration takes feeds in slices and merges each slice's ranges
    # (its merge-as-you-go option drops them: onnxruntime 1.32)
    def __len__(self) -> int:
        return self._count

    def set_range(self, start_index: int, end_index: int) -> None:
        self._left = end_index - start_index

    def get_next(self):
        if self._left <= 0:
            return None
        self._left -= 1
        return next(self._it, None)

    @staticmethod
    def _steps(model, sequences, prefill_len: int, decode: bool):
        names = cache_names(model.cfg.num_layers)
        i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        for ids in sequences:
            steps = _decode_positions(len(ids), prefill_len) if decode else []
            caches, pos = model.new_cache(), 0
            while pos < len(ids):
                step = pos in steps
                later = [p for p in steps if p > pos]
                n = 1 if step else min(prefill_len, (later[0] if later else len(ids)) - pos)
                tokens = torch.zeros(1, 1 if step else prefill_len, dtype=torch.int32)
                tokens[0, :n] = i32(ids[pos:pos + n])
                if decode == step:  # a step this graph runs
                    feed = {"tokens": tokens.numpy(), "pos": i32([pos]).numpy()}
                    if not decode:
                        feed["length"] = i32([n]).numpy()
                    yield {**feed, **{k: c.numpy() for k, c in zip(names, caches)}}
                with torch.no_grad():
                    _, caches = model.step(tokens, i32([pos]), i32([n]), caches)
                pos += n


def _decode_positions(length: int, prefill_len: int) -> list[int]:
    """Where a calibration sequence of `length` tokens is fed one token at a time: half of
    CALIBRATION_DECODES right after the first prefill chunk, the rest at its end."""
    first, early = min(prefill_len, length), CALIBRATION_DECODES // 2
    head = range(first, min(length, first + early))
    tail = range(max(first + early, length - (CALIBRATION_DECODES - early)), length)
    return [*head, *tail]


def _quantize(src: Path, dst: Path, feeds, bits: int, codes: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    config = get_qnn_qdq_config(str(src), feeds, activation_type=QuantType.QUInt16 if bits == 16 else QuantType.QUInt8,
                                weight_type=QuantType.QInt8, per_channel=True, weight_symmetric=True, stride=1,
                                init_overrides=_weight_overrides(src, codes))
    config.use_external_data_format = True
    quantize(str(src), str(dst), config)


def _weight_overrides(src: Path, codes: dict) -> dict:
    """The recipe's own scales for each weight initializer, found by value (codes x scales), so the
    QDQ quantizer rounds each weight back to exactly its codes; the tied table, which the graph
    gathers from and transposes for the head, would otherwise be quantized as an activation."""
    onnx = require("onnx", "qnn")
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType

    graph = onnx.load(str(src)).graph
    stored = ((i.name, numpy_helper.to_array(i)) for i in graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2)
    overrides = {}
    for tensor, (name, layout) in match_weights(codes, stored, transposed=True).items():
        if layout == "oi":  # the gathered table (a MatMul weight is stored [in, out])
            continue
        scales = codes[name][1].reshape(-1).numpy().astype(np.float32)  # one per output channel
        kind = QuantType.QInt4 if codes[name][2].bits == 4 else QuantType.QInt8
        overrides[tensor] = [{"axis": 1, "scale": s, "zero_point": np.int8(0), "quant_type": kind} for s in scales]
    return overrides


_CODE_TYPES = (3, 22)  # onnx.TensorProto.INT8, INT4 (int4 codes packed two per byte in the file)


def _check_codes(graph: Path, codes: dict) -> None:
    """Each of the recipe's code arrays is stored in the QDQ graph (as is or transposed): onnxruntime
    re-derives int8 codes from the dequantized weights, which gives ours back only for max|w|/127
    scales; any other recipe would be silently re-rounded."""
    import hashlib

    onnx = require("onnx", "qnn")
    from onnx import numpy_helper

    held = set()
    for init in onnx.load(str(graph)).graph.initializer:
        if init.data_type in _CODE_TYPES:
            q = numpy_helper.to_array(init).astype(np.int8)
            held |= {hashlib.sha256(np.ascontiguousarray(a)).hexdigest() for a in (q, q.T)}
    for name, (q, _, _, _) in codes.items():
        if hashlib.sha256(np.ascontiguousarray(q.numpy())).hexdigest() not in held:
            raise ExportError(f"qnn: the QDQ quantizer did not keep the recipe's codes of {name} "
                              "(only round-to-nearest codes per channel survive its re-quantization)")


def _compile(graph: Path, workdir: Path, chip: Soc) -> dict:
    """Compile one graph for one SoC (EPContext model + context binary in workdir) and say what ran where."""
    onnx = require("onnx", "qnn")
    ctx = workdir / compiled_file(graph.name, chip.name)
    nodes = len(onnx.load(str(graph), load_external_data=False).graph.node)
    t0 = time.perf_counter()
    try:
        htp_session(graph, chip, context=ctx)
    except Exception as e:  # noqa: BLE001 - the provider's own message says little; find the nodes
        ctx.unlink(missing_ok=True)
        (workdir / _binary(ctx.name)).unlink(missing_ok=True)
        raise ExportError(f"qnn: the {graph.stem} graph does not compile whole for {chip.name}: "
                          f"{_fallen_back(graph, workdir, chip) or str(e).splitlines()[0]}") from None
    seconds = time.perf_counter() - t0
    binary = workdir / _binary(ctx.name)
    if not ctx.is_file() or not binary.is_file():
        raise ExportError(f"qnn: compiling the {graph.stem} graph for {chip.name} wrote no context binary")
    left = [n.op_type for n in onnx.load(str(ctx)).graph.node if n.op_type != "EPContext"]
    if left:
        raise ExportError(f"qnn: {len(left)} nodes of the {graph.stem} graph stayed off the HTP ({', '.join(sorted(set(left)))})")
    # the export process's peak so far (compiling happens in-process, after quantization)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return {"file": ctx.name, "binary": binary.name, "binary_bytes": binary.stat().st_size,
            "nodes": nodes, "nodes_on_npu": nodes, "seconds": round(seconds, 2), "process_peak_rss_mib": round(peak)}


def _fallen_back(graph: Path, workdir: Path, chip: Soc) -> str | None:
    """Which nodes the HTP refuses: compile again with CPU fallback and list what stayed outside
    (every node, when the provider took none and so wrote no EPContext model)."""
    onnx = require("onnx", "qnn")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ctx = Path(tmp) / "probe.onnx"
        try:
            htp_session(graph, chip, fallback=True, context=ctx)
        except Exception:  # noqa: BLE001 - then the provider's own message is all there is
            return None
        nodes = onnx.load(str(ctx if ctx.is_file() else graph), load_external_data=False).graph.node
        left = [f"{n.op_type} {n.name}" for n in nodes if n.op_type != "EPContext"]
    if not left:
        return None
    return f"{len(left)} nodes would fall back to the CPU: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}"


# ----------------------------------------------------------------------------------------------
# Session
# ----------------------------------------------------------------------------------------------


class QnnSession(BaseSession):
    """The compiled graphs of one SoC on the HTP emulator (CPU fallback disabled), or with
    `simulated` the QDQ graphs on onnxruntime's CPU provider: the recipe without the compiler."""

    def __init__(self, folder: Path, manifest, soc_name: str | None = None, simulated: bool = False, threads: int = 0):
        folder = Path(folder)
        self.info = session_info(manifest)
        self._folder, self._manifest, self._threads, self._debug = folder, manifest, threads, None
        self._graphs = manifest.program["graphs"]
        precision = manifest.program.get("precision")
        # artifacts written before the scale was recorded: fp16 ones carried it all the same
        self._residual_scale = manifest.program.get("residual_scale", RESIDUAL_SCALE if precision == "fp16" else 1.0)
        socs = manifest.program["socs"]
        self.soc = None if simulated else (soc_name or socs[0]).upper()
        if self.soc is not None and self.soc not in socs:
            raise ArtifactError(f"{folder} is compiled for {', '.join(socs)}, not {self.soc}")
        graphs = manifest.program["graphs"]
        if simulated:
            self._sessions = {e: cpu_session(folder / f, threads) for e, f in graphs.items()}
        else:
            chip = soc(self.soc)
            self._sessions = {e: htp_session(folder / compiled_file(f, chip.name), chip) for e, f in graphs.items()}
        inputs = {i["name"]: i for i in manifest.entry_points[DECODE]["inputs"]}
        self._names = cache_names(manifest.num_layers)
        self._shapes = [tuple(inputs[n]["shape"]) for n in self._names]
        self._outputs = ["logits", *(f"{n}_out" for n in self._names)]
        self.reset()

    def reset(self) -> None:
        self._cache = [np.zeros(s, dtype=np.float32) for s in self._shapes]

    def _run(self, tokens, pos, n, decode):
        feed = {"tokens": tokens, "pos": np.array([pos], dtype=np.int32), **dict(zip(self._names, self._cache))}
        if not decode:
            feed["length"] = np.array([n], dtype=np.int32)
        out = self._sessions[DECODE if decode else PREFILL].run(self._outputs, feed)
        self._cache = out[1:]
        return out[0][0]

    def _hidden(self, tokens, n):
        """The prefill graph with the residual stream after the embedding and after each layer as
        extra outputs, built from the artifact's QDQ (or float) graph on first use and compiled on the
        same HTP (CPU fallback disabled), or run on the CPU for the simulated session."""
        if self._debug is None:
            self._debug = _debug_session(self._folder / self._graphs[PREFILL], self._manifest,
                                         None if self.soc is None else soc(self.soc), self._threads)
        session, names = self._debug
        feed = {"tokens": tokens, "pos": np.array([0], dtype=np.int32), "length": np.array([n], dtype=np.int32),
                **{k: np.zeros(s, dtype=np.float32) for k, s in zip(self._names, self._shapes)}}
        states = session.run(names, feed)
        return np.stack([s[0] for s in states]) * self._residual_scale


def stream_tensors(graph) -> list[str]:
    """The residual stream's tensors in a traced step graph: the stream entering layer 0 and after
    each layer, found by the exporter's name scopes (the two adds directly under each decoder
    layer, `x = x + ...`). In a QDQ graph, each one's dequantized copy: the value the NPU holds."""
    adds: dict[int, list] = {}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), [])
        match = re.fullmatch(r"(?:.*\.)?layers\.(\d+)", scopes[1]) if len(scopes) == 3 else None
        if match:
            adds.setdefault(int(match.group(1)), []).append(node)
    if not adds or sorted(adds) != list(range(len(adds))) or any(len(a) != 2 for a in adds.values()):
        raise ArtifactError("the graph's residual adds are not where the exporter names them "
                            f"(found {[len(adds[k]) for k in sorted(adds)]} per layer): cannot read its hidden states")
    consumers = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def held(name: str) -> str:  # X -> QuantizeLinear -> DequantizeLinear: the dequantized X
        q = next((n for n in consumers.get(name, ()) if n.op_type == "QuantizeLinear"), None)
        dq = q and next((n for n in consumers.get(q.output[0], ()) if n.op_type == "DequantizeLinear"), None)
        return dq.output[0] if dq else name

    # layer 0's `x + post_attention_layernorm(h)`: its x is the embedding (already dequantized in QDQ)
    return [held(adds[0][0].input[0]), *(held(adds[k][1].output[0]) for k in sorted(adds))]


def _debug_session(graph: Path, manifest, chip: Soc | None, threads: int):
    """(session, output names) for `graph` with the residual stream as extra outputs."""
    onnx = require("onnx", "qnn")
    from onnx import helper

    proto = onnx.load(str(graph), load_external_data=False)
    names = stream_tensors(proto.graph)
    if len(names) != manifest.num_layers + 1:
        raise ArtifactError(f"{graph.name} has residual adds for {len(names) - 1} layers, the model {manifest.num_layers}")
    shape = [1, manifest.prefill_len, manifest.hidden_size]
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in names if n not in have)
    # from bytes, its weights read from the artifact's folder: nothing is written anywhere
    model = (proto.SerializeToString(), graph.parent)
    session = cpu_session(model, threads) if chip is None else htp_session(model, chip)
    return session, names


BACKEND = QnnBackend()
