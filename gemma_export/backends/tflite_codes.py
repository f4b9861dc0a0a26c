"""Integer weight codes inside a .tflite file: find, write and read them back.

The TFLite lowering of a quantized recipe converts the float twin of the model (weights exactly
codes x scales), lets ai-edge-quantizer give every FULLY_CONNECTED / EMBEDDING_LOOKUP weight the
quantized layout the runtime kernels expect (dynamic-range: integer weights, activations
quantized by the kernel), then overwrites the codes and scales with ours, so the file holds the
PyTorch codes bit for bit rather than a re-quantization of their float values.

Layouts (TFLite schema): int8 per channel = INT8 tensor [out, in] with fp32 scales [out] in the
tensor's QuantizationParameters (each subgraph's tensor carries its own copy); int4 blocks = INT4
tensor, two codes per byte (even element in the low nibble), with a BlockwiseQuantization pointing
to a FLOAT16 scales tensor [out, in/block]. Buffers may live after the flatbuffer (offset/size).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import re
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ..quant.packing import pack_int4, unpack_int4
from .base import match_weights


def _schema():
    from ai_edge_litert import schema_py_generated as fb

    return fb


class TfliteFile:
    """A memory-mapped .tflite; `write=True` patches buffers in place (sizes never change)."""

    def __init__(self, path: Path, write: bool = False, section: tuple[int, int] | None = None):
        self._f = open(path, "r+b" if write else "rb")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_WRITE if write else mmap.ACCESS_READ)
        # a model packed inside another file (a .litertlm bundle): (offset, size)
        self._buf = memoryview(self._map)[section[0]:section[0] + section[1]] if section else self._map
        self.fb = _schema()
        self.model = self.fb.Model.GetRootAs(self._buf, 0)

    def close(self):
        self.model = None
        self._map.flush()
        try:
            if isinstance(self._buf, memoryview):
                self._buf.release()
            self._map.close()
        except BufferError:  # numpy views still alive; the mapping closes when they go
            pass
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tensors(self, subgraph: int = 0):
        sg = self.model.Subgraphs(subgraph)
        return [(sg, sg.Tensors(i)) for i in range(sg.TensorsLength())]

    def data(self, tensor) -> np.ndarray:
        """uint8 view of a tensor's bytes (writable when opened for writing)."""
        b = self.model.Buffers(tensor.Buffer())
        if b.Offset() > 1:
            return np.frombuffer(self._buf, np.uint8, count=b.Size(), offset=b.Offset())
        d = b.DataAsNumpy()
        return np.zeros(0, np.uint8) if isinstance(d, int) else d

    def sharing(self, buffer: int):
        """Every (subgraph, tensor) in the file that uses this buffer."""
        out = []
        for si in range(self.model.SubgraphsLength()):
            out += [(sg, t) for sg, t in self.tensors(si) if t.Buffer() == buffer]
        return out

    def _block_scales(self, sg, tensor):
        q = tensor.Quantization()
        if q is None or q.DetailsType() != self.fb.QuantizationDetails.BlockwiseQuantization:
            raise ExportError(f"tflite: INT4 tensor {tensor.Name().decode()} has no block-wise quantization")
        bq = self.fb.BlockwiseQuantization()
        bq.Init(q.Details().Bytes, q.Details().Pos)
        return sg.Tensors(bq.Scales()), bq.BlockSize()

    def codes(self, sg, tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """(codes int8 [out, in], scales fp32) of an integer weight tensor, else None."""
        T = self.fb.TensorType
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
        if tensor.Type() == T.INT8 and len(shape) == 2:
            scales = tensor.Quantization().ScaleAsNumpy()
            return self.data(tensor).view(np.int8).reshape(shape).copy(), np.asarray(scales, np.float32)
        if tensor.Type() == T.INT4:
            st, _ = self._block_scales(sg, tensor)
            scales = self.data(st).view(np.float16).reshape(tuple(int(d) for d in st.ShapeAsNumpy()))
            return unpack_int4(self.data(tensor), shape[0] * shape[1]).reshape(shape), scales.astype(np.float32)
        return None

    def write_codes(self, sg, tensor, q: np.ndarray, s: np.ndarray) -> None:
        T = self.fb.TensorType
        name = tensor.Name().decode()
        if tuple(tensor.ShapeAsNumpy()) != q.shape:
            raise ExportError(f"tflite: {name} has shape {tuple(tensor.ShapeAsNumpy())}, codes {q.shape}")
        if tensor.Type() == T.INT8:
            self.data(tensor)[:] = q.astype(np.int8).view(np.uint8).reshape(-1)
            for _, t in self.sharing(tensor.Buffer()):
                self._set_channel_scales(name, t, s.reshape(-1))
        elif tensor.Type() == T.INT4:
            s16 = s.astype(np.float16)
            if not np.array_equal(s16.astype(np.float32), s):
                raise ExportError(f"tflite: scales of {name} are not representable in fp16")
            self.data(tensor)[:] = pack_int4(q).reshape(-1)
            for sgi, t in self.sharing(tensor.Buffer()):
                st, _ = self._block_scales(sgi, t)
                view = self.data(st).view(np.float16)
                if view.size != s16.size:
                    raise ExportError(f"tflite: {name} has {view.size} block scales, ours {s16.size}")
                view[:] = s16.reshape(-1)
        else:
            raise ExportError(f"tflite: {name} was not quantized (type {tensor.Type()})")

    @staticmethod
    def _set_channel_scales(name, tensor, scales):
        view = tensor.Quantization().ScaleAsNumpy()
        if isinstance(view, int) or view.size != scales.size:
            raise ExportError(f"tflite: {name} has no per-channel scales of size {scales.size}")
        view[:] = scales


def match_float_weights(path: Path, codes: dict) -> dict:
    """{tflite tensor name: weight name} for the float tensors equal to codes x scales."""
    with TfliteFile(path) as f:
        fp32 = f.fb.TensorType.FLOAT32
        stored = ((t.Name().decode(), f.data(t).view(np.float32)) for _, t in f.tensors(0)
                  if t.Type() == fp32 and t.ShapeLength() == 2)
        return {tensor: weight for tensor, (weight, _) in match_weights(codes, stored).items()}


def _granularity(kind: tuple[int, str, int]):
    from ai_edge_quantizer import qtyping

    return (qtyping.QuantGranularity.CHANNELWISE if kind[1] == "channel"
            else getattr(qtyping.QuantGranularity, f"BLOCKWISE_{kind[2]}"))


def _kind(kind: tuple[int, str, int]) -> str:
    return f"int{kind[0]} " + ("channel" if kind[1] == "channel" else f"block-{kind[2]}")


def reader_scopes(path: Path, tensors: set[str]) -> dict[str, set[str]]:
    """{tensor name (first subgraph): the scopes of the ops reading its buffer in every subgraph}:
    the subgraphs share weight buffers under their own tensor names, and ai-edge-quantizer names an
    op by its output tensors' names, each followed by ';'."""
    out: dict[str, set[str]] = {t: set() for t in tensors}
    with TfliteFile(path) as f:
        owner = {t.Buffer(): t.Name().decode() for _, t in f.tensors(0) if t.Name().decode() in tensors}
        for g in range(f.model.SubgraphsLength()):
            sg = f.model.Subgraphs(g)
            names = [sg.Tensors(i).Name().decode() for i in range(sg.TensorsLength())]
            weight = {i: owner[sg.Tensors(i).Buffer()] for i in range(sg.TensorsLength())
                      if sg.Tensors(i).Buffer() in owner}
            for o in range(sg.OperatorsLength()):
                op = sg.Operators(o)
                read = {weight[i] for i in op.InputsAsNumpy() if i in weight}
                scope = "".join(names[i] + ";" for i in op.OutputsAsNumpy() if i >= 0 and names[i])
                for t in read:
                    out[t].add(scope)
    return out


def quantize_file(path: Path, codes: dict, progress) -> list[str]:
    """Give the file's weights the quantized layout, then write our codes and scales into it."""
    from ai_edge_quantizer import qtyping, quantizer

    names = match_float_weights(path, codes)
    kinds = {w: (sc.bits, sc.granularity, sc.block_size) for w, (_, _, sc, _) in codes.items()}
    # the commonest scheme for every op, then each other weight's readers by their exact scopes
    # (ai-edge-quantizer applies the last matching config)
    default = max(set(kinds.values()), key=list(kinds.values()).count)
    others = {t: kinds[w] for t, w in names.items() if kinds[w] != default}
    progress(f"ai-edge-quantizer: {_kind(default)} layout for {len(names) - len(others)} weights"
             + (f", other schemes for {len(others)}" if others else ""))
    qt = quantizer.Quantizer(str(path))
    ops = (qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP)
    for op in ops:
        qt.add_dynamic_config(regex=".*", operation_name=op, num_bits=default[0], granularity=_granularity(default))
    for tensor, scopes in (reader_scopes(path, set(others)) if others else {}).items():
        for scope in scopes:
            for op in ops:
                qt.add_dynamic_config(regex="^" + re.escape(scope) + "$", operation_name=op,
                                      num_bits=others[tensor][0], granularity=_granularity(others[tensor]))
    staged = path.with_suffix(".quant.tflite")
    # its report and progress bars say nothing our own progress line does not (and one bar ignores
    # enable_progress_bar in this version); errors still raise
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        qt.quantize(serialize_to_path=str(staged), enable_progress_bar=False, enable_progress_report=False)
    del qt
    progress(f"writing our integer codes into {len(names)} weights")
    with TfliteFile(staged, write=True) as f:
        by_name = {t.Name().decode(): (sg, t) for sg, t in f.tensors(0)}
        for tname, wname in names.items():
            if tname not in by_name:
                raise ExportError(f"tflite: quantized file lost tensor {tname}")
            q, s, _, _ = codes[wname]
            f.write_codes(*by_name[tname], q.numpy(), s.numpy().astype(np.float32))
    with TfliteFile(staged) as f:  # read everything back: the file must hold exactly our codes
        by_name = {t.Name().decode(): (sg, t) for sg, t in f.tensors(0)}
        extra = sorted(n for n, (sg, t) in by_name.items() if n not in names and f.codes(sg, t) is not None)
        if extra:
            raise ExportError(f"tflite: weight {extra[0]} was quantized but the recipe keeps it float")
        ours = {by_name[n][1].Buffer() for n in names if n in by_name}
        for g in range(1, f.model.SubgraphsLength()):  # every signature reads the same (our) buffers
            stray = [t.Name().decode() for sg, t in f.tensors(g) if t.Buffer() not in ours and f.codes(sg, t) is not None]
            if stray:
                raise ExportError(f"tflite: signature {g} quantized {stray[0]} on its own, not with our codes")
        for tname, wname in names.items():
            got = f.codes(*by_name[tname])
            q, s, _, _ = codes[wname]
            if got is None or not np.array_equal(got[0], q.numpy()) or not np.array_equal(
                    got[1].reshape(-1), s.numpy().astype(np.float32).reshape(-1)):
                raise ExportError(f"tflite: codes of {wname} did not survive the write")
    staged.replace(path)
    return sorted(names.values())


def read_codes(path: Path, section: tuple[int, int] | None = None) -> dict:
    """{tensor name: codes int8 [out, in]} of every integer weight in the file (first signature)."""
    out = {}
    with TfliteFile(path, section=section) as f:
        for sg, t in f.tensors(0):
            got = f.codes(sg, t)
            if got is not None:
                out[t.Name().decode()] = got[0]
    return out


def signatures(f: TfliteFile) -> dict[str, dict]:
    """{signature: {"inputs": [...], "outputs": [...]}} with each tensor's name, shape and dtype."""
    fb = f.fb
    dtypes = {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    out = {}
    for i in range(f.model.SignatureDefsLength()):
        sig = f.model.SignatureDefs(i)
        sg = f.model.Subgraphs(sig.SubgraphIndex())

        def describe(n, get, sg=sg):
            rows = []
            for j in range(n):
                item = get(j)
                t = sg.Tensors(item.TensorIndex())
                rows.append({"name": item.Name().decode(), "shape": [int(d) for d in t.ShapeAsNumpy()]
                             if t.ShapeLength() else [], "dtype": dtypes.get(t.Type(), str(t.Type()))})
            return rows

        out[sig.SignatureKey().decode()] = {"inputs": describe(sig.InputsLength(), sig.Inputs),
                                             "outputs": describe(sig.OutputsLength(), sig.Outputs)}
    return out
