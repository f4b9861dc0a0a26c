"""ExecuTorch (.pte): prefill and decode methods in one program, lowered to XNNPACK.

The KV cache lives inside the program as mutable buffers shared by both methods
(`MemoryPlanningPass(share_mutable_buffers=True)`), each sized per layer type exactly as in the
PyTorch model. Weights are stored once (XNNPACK's named data store deduplicates them).

The tied token table is read twice: gathered by the program (a portable op) and multiplied by
XNNPACK as the head, which keeps its own copy of its weights. Both are tagged for an external
data file (`model.ptd`), where ExecuTorch's serializer stores identical bytes once; the packed
layout of quantized tables (quantize.pack_for_gather) is chosen to equal XNNPACK's.
"""

from __future__ import annotations

import copy
import gc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from converters import check_recipe
from gemma_export.errors import ArtifactError, UnsupportedError
from gemma_export.session import SessionInfo, check_room
from gemma_export.trace import DECODE, PREFILL, cache_names, describe_io, sample_inputs

FORMAT = "pte"
FILE = "model.pte"
DATA_TAG = "model"  # -> model.ptd: the token table, shared by the lookup and the head
HIDDEN = "hidden"
RESET = "reset"  # zeroes the KV cache: call once after loading and before each new sequence


def check(request) -> None:
    check_recipe(FORMAT, request)


class _Cache(nn.Module):
    def __init__(self, model):
        super().__init__()
        for name, shape in zip(cache_names(model.cfg.num_layers), model.cache_shapes()):
            self.register_buffer(name, torch.zeros(shape, dtype=model.dtype))


class _Step(nn.Module):
    """One entry point over the shared model and the shared cache buffers."""

    def __init__(self, model, cache: _Cache, decode: bool):
        super().__init__()
        self.model, self.cache, self.decode = model, cache, decode
        self.names = cache_names(model.cfg.num_layers)

    def forward(self, tokens, pos, length=None):
        if self.decode:
            length = torch.ones(1, dtype=torch.int32)
        caches = [getattr(self.cache, n) for n in self.names]
        logits, new = self.model.step(tokens, pos, length, caches)
        for buf, value in zip(caches, new):
            buf.copy_(value)
        return logits


class _Reset(nn.Module):
    """Zero the shared cache buffers. The program stores no initial cache state (at the 1B's
    4,096 context that would be 108 MiB of zeros in the file); the runtime's planned memory is
    not guaranteed to be zero, and unwritten slots, though masked, must not hold NaN or Inf."""

    def __init__(self, cache: _Cache):
        super().__init__()
        self.cache = cache

    def forward(self, token):
        for buf in self.cache.buffers():
            buf.zero_()
        return token + 0


class _Hidden(nn.Module):
    """Debug method: the residual stream per layer for a chunk at position 0 (cache untouched)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, length):
        caches = [torch.zeros(s, dtype=self.model.dtype) for s in self.model.cache_shapes()]
        _, _, hidden = self.model.step(tokens, torch.zeros(1, dtype=torch.int32), length, caches, hidden=True,
                                       head=False)  # an unused quantized head would stay in the program
        return hidden


@contextmanager
def _share_weights_on_deepcopy(min_bytes: int = 1 << 16):
    """Make deepcopy share large plain tensors instead of copying them.

    ExecuTorch deep-copies each whole program in `to_edge` and again per delegated partition
    before XNNPACK serializes it; with fp32 1B weights that meant five copies (OOM past 21 GB on
    this 24 GB machine). The passes build new tensors rather than writing into weights, so the
    copies can share storage; the parity tests check the result against eager PyTorch.
    """
    originals = {cls: cls.__deepcopy__ for cls in (torch.Tensor, nn.Parameter)}

    def shared(cls):
        def deepcopy(self, memo):
            if type(self) is cls and not self.is_meta and self.numel() * self.element_size() >= min_bytes:
                memo[id(self)] = self
                return self
            return originals[cls](self, memo)
        return deepcopy

    for cls in originals:
        cls.__deepcopy__ = shared(cls)
    try:
        yield
    finally:
        for cls, fn in originals.items():
            cls.__deepcopy__ = fn


def export(model, request, workdir: Path, progress) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    from gemma_export.quantize import use_xnnpack_pattern

    if use_xnnpack_pattern(model):
        progress("quantized layers written as torchao's pattern for XNNPACK's integer kernels")
    cache = _Cache(model)
    entry, io = {}, {}
    for name, t, decode in ((PREFILL, request.prefill_len, False), (DECODE, 1, True)):
        inputs = sample_inputs(model, t, decode, with_cache=False)
        progress(f"torch.export {name} (T={t})")
        with torch.no_grad():
            entry[name] = torch.export.export(_Step(model, cache, decode), tuple(inputs.values()), strict=False)
        io[name] = describe_io(inputs, {"logits": torch.zeros(1, t, model.cfg.vocab_size)})
    with torch.no_grad():
        entry[RESET] = torch.export.export(_Reset(cache), (torch.zeros(1, dtype=torch.int32),), strict=False)
    if request.debug_outputs:
        progress(f"torch.export {HIDDEN} (debug, T={request.prefill_len})")
        tokens, length = torch.zeros(1, request.prefill_len, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
        with torch.no_grad():
            entry[HIDDEN] = torch.export.export(_Hidden(model), (tokens, length), strict=False)
    del model, cache  # the exported programs hold the weights now; nothing else should
    gc.collect()
    for ep in entry.values():
        _drop_unused_buffers(ep)
        _tag_table_for_delegate(ep)
    progress("lowering to XNNPACK")
    with _share_weights_on_deepcopy():
        edge = to_edge_transform_and_lower(entry, partitioner=[XnnpackPartitioner()])
    del entry  # delegated weights now live in XNNPACK's serialized data; free the float copies
    gc.collect()
    progress("emitting ExecuTorch program")
    program = edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
        emit_mutable_buffer_names=True,
        external_constants=lambda node: DATA_TAG if _is_table(node.name) else None,
    ))
    del edge
    gc.collect()
    with (workdir / FILE).open("wb") as f:
        program.write_to_file(f)
    program.write_tensor_data_to_file(str(workdir))
    data_file = f"{DATA_TAG}.ptd"
    if not (workdir / data_file).exists():
        raise ArtifactError(f"ExecuTorch wrote no {data_file} for the token table")

    return {
        "entry_points": {PREFILL: io[PREFILL], DECODE: io[DECODE]},
        "program": {"file": FILE, "external_data": data_file, "backend": "XnnpackPartitioner",
                    "kv_cache": "mutable buffers in the program",
                    "debug_entry_point": HIDDEN if request.debug_outputs else None,
                    "reset_method": RESET},
        "versions": _versions(),
    }


def _is_table(name: str) -> bool:
    # the tied parameter may come out of lowering under either of its names
    return "embed_tokens" in name or "lm_head" in name


def _drop_unused_buffers(ep) -> None:
    """Remove constant buffers no node reads (torch.export lifts every buffer of the module, and
    ExecuTorch only prunes unused parameters): the debug method would otherwise carry the
    quantized head's codes, which it never runs."""
    from torch.export.graph_signature import InputKind

    sig = ep.graph_signature
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    mutated = set(sig.buffers_to_mutate.values())
    unused = [s for s in sig.input_specs if s.kind == InputKind.BUFFER and s.target not in mutated
              and not nodes[s.arg.name].users]
    if not unused:
        return
    new_sig = copy.deepcopy(sig)
    for spec in unused:
        new_sig.input_specs.remove(spec)
        ep.state_dict.pop(spec.target, None)
        ep.constants.pop(spec.target, None)
        ep.graph.erase_node(nodes[spec.arg.name])
    ep._graph_signature = new_sig
    ep.graph_module.recompile()


def _tag_table_for_delegate(ep) -> None:
    """Mark the token table's placeholders so XNNPACK puts its copy in the external data file."""
    sig = {**ep.graph_signature.inputs_to_parameters, **ep.graph_signature.inputs_to_buffers}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and _is_table(sig.get(node.name, "")):
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG


def read_named_data(folder: Path, manifest: dict) -> dict[str, bytes]:
    """Every named blob of the artifact (XNNPACK's weights and scales, the external token table),
    by key, from the .pte and its .ptd. XNNPACK keeps int4 codes as pack_nibbles lays them out
    and int8 codes as they are, so they can be compared byte for byte with PyTorch's."""
    from executorch.exir._serialize._cord import Cord
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    prog = manifest["program"]
    pte = deserialize_pte_binary((folder / prog["file"]).read_bytes())
    out = {}
    if pte.named_data is not None:
        out.update({k: bytes(pte.named_data.buffers[e.buffer_index]) for k, e in pte.named_data.pte_data.items()})
    if prog.get("external_data"):
        ptd = FlatTensorSerializer().deserialize(Cord((folder / prog["external_data"]).read_bytes()))
        out.update({k: bytes(ptd.buffers[e.buffer_index]) for k, e in ptd.named_data.items()})
    return out


def _versions():
    from gemma_export.package import versions

    return versions("executorch", "torchao")


class PteSession:
    def __init__(self, folder: Path, manifest: dict, threads: int):
        from executorch.runtime import Runtime

        path = folder / manifest["program"]["file"]
        data = manifest["program"].get("external_data")
        try:
            self._program = Runtime.get().load_program(str(path), data_path=str(folder / data) if data else None)
            self._prefill = self._program.load_method(PREFILL)
            self._decode = self._program.load_method(DECODE)
            self._reset = self._program.load_method(RESET)
            self._hidden = None
        except Exception as e:
            raise ArtifactError(f"{path}: ExecuTorch could not load the program ({e})") from None
        cfg = manifest["model"]["config"]
        self.info = SessionInfo(manifest["prefill_len"], manifest["max_context"], cfg["vocab_size"], manifest["window"])
        self.reset()

    def reset(self) -> None:
        self._reset.execute([torch.zeros(1, dtype=torch.int32)])

    def prefill(self, tokens, pos: int) -> np.ndarray:
        n = len(tokens)
        check_room(self.info, pos, n)
        t = torch.zeros(1, self.info.prefill_len, dtype=torch.int32)
        t[0, :n] = torch.as_tensor(list(tokens), dtype=torch.int32)
        out = self._prefill.execute([t, torch.tensor([pos], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)])
        return out[0][0, :n].numpy()

    def hidden_states(self, tokens) -> np.ndarray:
        n = len(tokens)
        check_room(self.info, 0, n)
        t = torch.zeros(1, self.info.prefill_len, dtype=torch.int32)
        t[0, :n] = torch.as_tensor(list(tokens), dtype=torch.int32)
        if self._hidden is None:
            if HIDDEN not in self._program.method_names:
                raise UnsupportedError("this artifact was exported with --no-debug-outputs; re-export it to locate")
            self._hidden = self._program.load_method(HIDDEN)
        return self._hidden.execute([t, torch.tensor([n], dtype=torch.int32)])[0][:, :n].numpy()

    def decode(self, token: int, pos: int) -> np.ndarray:
        check_room(self.info, pos, 1)
        out = self._decode.execute([torch.tensor([[int(token)]], dtype=torch.int32), torch.tensor([pos], dtype=torch.int32)])
        return out[0][0, 0].numpy()


def open(folder: Path, manifest: dict, threads: int) -> PteSession:  # noqa: A001 - protocol name
    return PteSession(folder, manifest, threads)
