"""ExecuTorch (.pte): the program ExecuTorch's LLM runner drives, lowered to XNNPACK.

One method, `forward(tokens int64 [1, T], input_pos int64 [1])` -> the last token's logits
[1, 1, V], serves prefill chunks (T up to the prefill length, a dynamic dimension) and decode
(T = 1), and the constant methods the runner reads (`get_max_seq_len`, `get_eos_ids`, ...)
describe it, so `TextLLMRunner` / `llama_main` run the artifact as they are. Like ExecuTorch's own
LLM exports, a prefill chunk computes the head (a 262K-row matrix) for its last token only: the
runner samples from nothing else. `score` (a debug method, on the same caches) returns every
position's logits, which teacher-forced verification needs. The KV cache lives inside the program
as mutable buffers shared by every method (`MemoryPlanningPass(share_mutable_buffers=True)`), laid
out [1, S, kv heads, head_dim] as ExecuTorch's LLM kernels want them, and updated in place by
those kernels (`llama::update_cache`, the ops llama_main is built with): a global layer writes
each position once at its own slot and attends only over the positions in use
(`llama::custom_sdpa` from `input_pos`), so a step's cost follows the conversation, not the
context; a local layer is a ring of window + chunk - 1 slots, written at position mod size and
attended through a mask of the positions its slots hold.

Quantized layers are written as torchao's choose-qparams / quantize / dequantize pattern, which
XNNPACK runs as integer GEMMs on the codes (its own dynamic int8 activations). The tied token
table is read twice: gathered by the program (a portable op) and multiplied by XNNPACK as the
head, which keeps its own copy of its weights. Both are tagged for an external data file
(`model.ptd`), where ExecuTorch's serializer stores identical bytes once; the gathered copy is laid
out exactly as XNNPACK stores the head's.
"""

from __future__ import annotations

import copy
import gc
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import quiet
from ..artifact import Manifest, versions
from ..errors import ArtifactError, UnsupportedError
from ..gemma3 import family
from ..gemma3.model import NEG_INF, int8_codes_per_token, plain_forms
from ..quant.algorithms import qrange
from ..quant.modules import QEmbedding, QLinear, TiedQHead
from ..quant.packing import pack_int4, unpack_int4
from ..quant.quantize import quantized_state
from ..session import BaseSession
from ..trace import cache_names, describe_io, sample_outputs
from .base import Exported, Lowering, Runner, Stock, require, session_info

FILE = "model.pte"
DATA_TAG = "model"  # -> model.ptd: the token table, shared by the lookup and the head
FORWARD = "forward"
SCORE = "score"  # debug: forward with every position's logits [1, T, V]
HIDDEN = "hidden"
RESET = "reset"  # zeroes the KV cache (optional: a freshly loaded program starts valid)
# image prompts, named as ExecuTorch's MultimodalRunner calls them
VISION = "vision_encoder"  # pixels float32 [1, 3, S, S] -> [1, tokens, hidden]
EMBED = "token_embedding"  # tokens int64 [1, T] -> [1, T, hidden]
DECODER = "text_decoder"  # embeddings [1, T, hidden], input_pos int64 [1] -> the last one's logits [1, 1, V]
IMAGE_CHUNK = "set_image_chunk"  # int32 [1]: 1 makes text_decoder's next chunks one image view


class PteBackend:
    name = "pte"
    # XNNPACK delegates integer weights only with its own dynamic int8 activations: qc8w / qb4w
    # fp16 caches: the same kernels on fp16; int8: ExecuTorch's quantized ones (per token and KV head)
    lowering = Lowering(frozenset({(8, "channel"), (4, "block")}), frozenset({"int8-dynamic"}),
                        kv_dtypes=frozenset({"fp32", "fp16", "int8"}))
    runner = Runner("GEMMA_PTE_RUNNER",
                    "ExecuTorch's llama runner (llama_main, built from executorch/examples/models/llama\n"
                    "with XNNPACK, quantized and LLM custom kernels), run as\n"
                    "$GEMMA_PTE_RUNNER --model_path model.pte --data_path model.ptd\n"
                    "--tokenizer_path tokenizer.json --prompt ... --temperature 0",
                    stock_args=("--model_path", "artifact/model.pte", "--data_path", "artifact/model.ptd",
                                "--tokenizer_path", "artifact/tokenizer.json", "--prompt", "{prompt}",
                                "--temperature", "0", "--seq_len", "{seq_len}"))

    images = True  # vision_encoder, token_embedding and text_decoder beside forward

    def export(self, model, job, workdir: Path, progress, vocab, vision=None) -> Exported:
        require("executorch.exir", self.name)
        quantized = [{"name": n, "shape": list(q.shape), "bits": scheme.bits}
                     for n, (q, _, scheme) in quantized_state(model).items()]
        if _to_xnnpack_pattern(model):
            progress("quantized layers written as torchao's pattern for XNNPACK's integer kernels")
        lengths = tuple(shape[1] for shape in cache_shapes(model, _chunk(model, job, vision))[::2])
        programs, io = _export_methods(model, job, progress, vision)
        metadata = runner_metadata(model, job, vocab)
        del model  # the exported programs hold the weights now; nothing else should
        gc.collect()
        _lower_and_write(programs, metadata, workdir, progress)
        return Exported(
            entry_points=io,
            program={"file": FILE, "external_data": f"{DATA_TAG}.ptd", "backend": "XnnpackPartitioner",
                     "kv_cache": "mutable buffers in the program, updated in place (llama::update_cache)", "runner_metadata": metadata,
                     "debug_entry_point": HIDDEN if job.debug_outputs else None, "reset_method": RESET,
                     "quantized_weights": quantized},
            versions=versions("executorch", "torchao"), cache_lengths=lengths,
            images=None if vision is None else (vision.cfg, {"vision_encoder": VISION, "token_embedding": EMBED,
                                                             "text_decoder": DECODER, "image_chunk": IMAGE_CHUNK}))

    def open(self, folder: Path, manifest: Manifest, threads: int) -> "PteSession":
        return PteSession(folder, manifest, threads)

    def read_codes(self, folder: Path, manifest: Manifest) -> list[np.ndarray]:
        """Every blob of the program and its data file that has the size of a quantized weight,
        decoded as that weight's codes [out, in]: XNNPACK keeps int8 codes as they are and int4
        codes as code + 8, two per byte (the gathered table is stored in the same layout)."""
        kinds = {(tuple(w["shape"]), w["bits"]) for w in manifest.program.get("quantized_weights", [])}
        out = []
        for blob in read_named_data(folder, manifest).values():
            raw = np.frombuffer(blob, np.uint8)
            for shape, bits in kinds:
                count = int(np.prod(shape))
                if bits == 8 and raw.size == count:
                    out.append(raw.view(np.int8).reshape(shape))
                elif bits == 4 and raw.size * 2 == count:
                    out.append(unpack_int4(raw, count, offset=True).reshape(shape))
        return out


    def declared_io(self, folder: Path, manifest: Manifest) -> dict[str, dict]:
        """The tensor inputs and outputs of each method the manifest describes, as the program
        declares them (a program has no tensor names: None); the weights are not loaded. The
        runner's scalar metadata methods are left out (asking for their tensor info logs errors)."""
        runtime = require("executorch.runtime", self.name)
        try:
            with quiet.native_info_lines():
                program = runtime.Runtime.get().load_program(folder / manifest.program["file"])
        except Exception as e:  # the runtime raises RuntimeError/ValueError on a damaged program
            raise ArtifactError(f"{folder / manifest.program['file']}: ExecuTorch cannot read the program ({e})") from None
        dtypes = {3: "int32", 4: "int64", 5: "float16", 6: "float32", 11: "bool", 15: "bfloat16"}
        out = {}
        wanted = {*manifest.entry_points, manifest.program.get("debug_entry_point"), manifest.program.get("reset_method")}
        for name in sorted(set(program.method_names) & wanted):
            meta = program.metadata(name)

            def describe(n, get):
                rows = []
                for i in range(n):
                    try:
                        t = get(i)
                    except IndexError:  # a scalar (the runner's metadata methods return ints)
                        return None
                    rows.append({"name": None, "shape": list(t.sizes()), "dtype": dtypes.get(int(t.dtype()), str(t.dtype()))})
                return rows

            ins, outs = describe(meta.num_inputs(), meta.input_tensor_meta), describe(meta.num_outputs(), meta.output_tensor_meta)
            if ins is not None and outs is not None:
                out[name] = {"inputs": ins, "outputs": outs}
        return out

    def stock_generate(self, folder: Path, manifest: Manifest, text: str, max_new_tokens: int) -> Stock:
        """Greedy text from ExecuTorch's own LLM runner (`TextLLMRunner`, the engine of llama_main),
        run in a fresh process: in a process that has loaded onnxruntime's QNN execution provider
        (a qnn artifact verified first, say) the runner dies of a segmentation fault."""
        return _stock_text(manifest, _in_fresh_process(_runner_text, _runner_files(folder, manifest),
                                                       text, max_new_tokens))


def _runner_files(folder, manifest: Manifest) -> tuple[str, str, str]:
    folder, prog = Path(folder), manifest.program
    return str(folder / prog["file"]), str(folder / manifest.tokenizer.file), str(folder / prog["external_data"])


def _in_fresh_process(fn, *args):
    """fn(*args) in a spawned process: ExecuTorch's LLM runners die of a segmentation fault in a
    process that has loaded onnxruntime's QNN execution provider."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _stock_text(manifest: Manifest, pieces: list[str]) -> Stock:
    if pieces and pieces[-1] in manifest.tokenizer.stop:  # a runner streams the stop token, then stops
        pieces.pop()
    return Stock("".join(pieces))  # the runners stream text only


def _runner_text(files: tuple[str, str, str], text: str, max_new_tokens: int) -> list[str]:
    """TextLLMRunner's streamed pieces for a greedy run (`stock_generate`'s child process)."""
    require("executorch.kernels.quantized", "pte")  # registers the kernels the runner needs
    require("executorch.extension.llm.custom_ops.custom_ops", "pte")
    llm = require("executorch.extension.llm.runner", "pte")
    pieces: list[str] = []
    llm.TextLLMRunner(*files).generate(text, llm.GenerationConfig(echo=False, max_new_tokens=max_new_tokens,
                                                                  temperature=0.0, num_bos=1, num_eos=0),
                                       token_callback=pieces.append)
    return pieces


BACKEND = PteBackend()


def stock_multimodal(folder: Path, manifest: Manifest, ids, pixels: np.ndarray, max_new_tokens: int) -> Stock:
    """Greedy text from ExecuTorch's own MultimodalRunner on an image prompt: the prompt's token
    runs and its views (pixels [views, 3, S, S], one per run of image tokens) as its inputs. The
    runner knows no image views: their tokens attend causally there. It runs in a fresh process,
    as `stock_generate` does."""
    image = manifest.images["vision"]["image_token_id"]
    segments, run, view = [], [], 0  # ("tokens", ids) and ("image", pixels [3, S, S]) in prompt order
    for i, t in enumerate(ids):
        if t != image:
            run.append(int(t))
        elif i == 0 or ids[i - 1] != image:  # a view starts
            if run:
                segments.append(("tokens", run))
                run = []
            segments.append(("image", np.ascontiguousarray(pixels[view])))
            view += 1
    if run:
        segments.append(("tokens", run))
    return _stock_text(manifest, _in_fresh_process(_runner_multimodal, _runner_files(folder, manifest),
                                                   segments, max_new_tokens))


def _runner_multimodal(files: tuple[str, str, str], segments: list, max_new_tokens: int) -> list[str]:
    """MultimodalRunner's streamed pieces for a greedy run (`stock_multimodal`'s child process)."""
    require("executorch.kernels.quantized", "pte")
    require("executorch.extension.llm.custom_ops.custom_ops", "pte")
    llm = require("executorch.extension.llm.runner", "pte")
    inputs = [llm.make_token_input(value) if kind == "tokens" else llm.make_image_input(torch.from_numpy(value))
              for kind, value in segments]
    with quiet.native_info_lines():
        runner = llm.MultimodalRunner(*files)
    pieces: list[str] = []
    runner.generate(inputs, llm.GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0,
                                                 num_bos=0, num_eos=0), pieces.append)
    return pieces


# ----------------------------------------------------------------------------------------------
# XNNPACK's spelling of the quantized modules
# ----------------------------------------------------------------------------------------------


def dynamic_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 activations (asymmetric per token) as torchao's quant primitives.

    XNNPACK recognises this choose-qparams / quantize / dequantize pattern feeding a linear layer
    and runs the layer as an int8-activation integer GEMM on the weight codes.
    """
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    # torchao wraps these two in torch.no_grad(); each of those grad toggles splits torch.export's
    # graph, which it then re-inlines piece by piece (minutes per method). The undecorated
    # functions record the same ops without the toggles.
    choose, quantize = (getattr(f, "__wrapped__", f) for f in (choose_qparams_affine, quantize_affine))
    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    scale, zero = choose(x, MappingType.ASYMMETRIC, block, torch.int8, quant_min=-128,
                         quant_max=127, zero_point_dtype=torch.int8)
    q = quantize(x, block, scale, zero, torch.int8, quant_min=-128, quant_max=127)
    return dequantize_affine(q, block, scale, zero, torch.int8, -128, 127, output_dtype=x.dtype)


def _affine_linear(x, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """x (dynamically int8-quantized) @ (codes x scales)^T, written as torchao's dequantize_affine."""
    from torchao.quantization.quant_primitives import dequantize_affine

    lo, hi = qrange(bits)
    w = dequantize_affine(q, (1, q.shape[1] // scale.shape[1]), scale, zero, torch.int8, lo, hi,
                          output_dtype=torch.float32)
    return F.linear(dynamic_int8_per_token(x), w)


class _XnnpackLinear(nn.Module):
    """A QLinear's codes and scales in the pattern XNNPACK lowers (int8-dynamic schemes only)."""

    def __init__(self, src: QLinear):
        super().__init__()
        for name in ("qweight", "scale", "zero_point"):
            self.register_buffer(name, getattr(src, name))
        self.bits = src.scheme.bits

    def forward(self, x):
        return _affine_linear(x, self.qweight, self.scale, self.zero_point, self.bits)


class _PackedTable(nn.Module):
    """The token table gathered from a compact copy laid out as XNNPACK stores the head's weights:
    4-bit codes + 8 two per byte with bf16 scales (exact: our scales are bf16 values), 8-bit codes
    as they are with fp32 scales. The head (`_XnnpackHead`) reads qweight/scale/zero_point."""

    def __init__(self, src: QEmbedding):
        super().__init__()
        for name in ("qweight", "scale", "zero_point"):
            self.register_buffer(name, getattr(src, name))
        self.bits, self.embedding_dim = src.scheme.bits, src.embedding_dim
        codes = torch.from_numpy(pack_int4(src.qweight.numpy(), offset=True)) if self.bits == 4 else src.qweight
        self.register_buffer("packed_codes", codes, persistent=False)
        # XNNPACK keeps blockwise (int4) scales as bf16 and per-channel (int8) scales as fp32
        self.register_buffer("packed_scale", src.scale.to(torch.bfloat16 if self.bits == 4 else torch.float32),
                             persistent=False)

    def forward(self, ids):
        rows = F.embedding(ids, self.packed_codes).to(torch.float32)  # gather the codes, then scale
        if self.bits == 4:  # unpack in float ops, which every runtime's portable kernels run
            hi = torch.floor(rows / 16.0)
            rows = torch.stack((rows - 16.0 * hi, hi), dim=-1).reshape(*rows.shape[:-1], 2 * rows.shape[-1]) - 8.0
        s = F.embedding(ids, self.packed_scale).to(torch.float32)
        return rows * s.repeat_interleave(self.embedding_dim // self.packed_scale.shape[1], dim=-1)


class _XnnpackHead(TiedQHead):
    """The tied head on the packed table's codes and scales, in the pattern XNNPACK lowers."""

    def forward(self, x):
        t = self.embedding[0]
        return _affine_linear(x, t.qweight, t.scale, t.zero_point, t.bits)


def _to_xnnpack_pattern(model) -> int:
    """Swap the quantized modules for their XNNPACK spelling in place; returns how many."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _XnnpackLinear(mod))
            swapped += 1
    table = getattr(model, family.TABLE)
    if isinstance(table, QEmbedding):
        packed = _PackedTable(table)
        setattr(model, family.TABLE, packed)
        if isinstance(getattr(model, family.HEAD), TiedQHead):
            setattr(model, family.HEAD, _XnnpackHead(packed))
            swapped += 1
    return swapped


# ----------------------------------------------------------------------------------------------
# Methods: prefill, decode, reset (and the debug method) over one shared cache
# ----------------------------------------------------------------------------------------------


def cache_shapes(model, chunk: int) -> list[tuple[int, ...]]:
    """The program's flat cache shapes [k0, v0, k1, v1, ...], each [1, S, kv heads, head_dim]:
    S = the context on global layers; on local layers a ring of window + chunk - 1 slots (a chunk
    of up to `chunk` tokens is written before it attends, and must not overwrite a key its first
    token still needs), never more than the context."""
    cfg, ctx = model.cfg, model.max_context
    shapes = []
    for i in range(cfg.num_layers):
        n = ctx if cfg.is_global(i) else min(cfg.sliding_window + chunk - 1, ctx)
        shapes += [(1, n, cfg.num_kv_heads, cfg.head_dim)] * 2
    return shapes


class Int8Cache(NamedTuple):
    """One int8 cache: codes [1, S, kv heads, head_dim], with a float32 scale and an int8 zero
    point per slot and head ([1, S, kv heads, 1]), the layout ExecuTorch's quantized kernels read."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


class _Cache(nn.Module):
    def __init__(self, model, chunk: int, images: bool = False):
        super().__init__()
        self.names = cache_names(model.cfg.num_layers)
        # each layer's caches in what its attention reads (Gemma3.set_kv_dtype: local rings stay fp32)
        kinds = [layer.self_attn.kv_dtype for layer in model.layers for _ in range(2)]
        self.int8 = {name for name, kind in zip(self.names, kinds) if kind == "int8"}
        for name, shape, kind in zip(self.names, cache_shapes(model, chunk), kinds):
            dtype = {"int8": torch.int8, "fp16": torch.float16}.get(kind, model.dtype)
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
            if name in self.int8:
                self.register_buffer(f"{name}_scales", torch.ones(*shape[:-1], 1, dtype=torch.float32))
                self.register_buffer(f"{name}_zeros", torch.zeros(*shape[:-1], 1, dtype=torch.int8))
        if images:  # 1 while text_decoder runs an image view (its tokens see each other), else 0
            self.register_buffer("image_chunk", torch.zeros(1, dtype=torch.int32))

    def entries(self) -> list:
        """The flat list [k0, v0, ...] the model passes to the attention kernel: tensors, or Int8Caches."""
        return [Int8Cache(getattr(self, n), getattr(self, f"{n}_scales"), getattr(self, f"{n}_zeros"))
                if n in self.int8 else getattr(self, n) for n in self.names]


class CacheOpsAttention:
    """The program's attention (`Gemma3.decode`'s `attention` hook) for an unpadded chunk of t
    tokens at input_pos (int64 [1]), on ExecuTorch's LLM kernels, the caches updated in place.

    Global layers: `update_cache` writes the chunk at its positions, `custom_sdpa` attends causally
    over positions 0 .. input_pos + t - 1 only. Local layers: `update_cache_with_indices` writes
    position p at slot p mod S; slot s then holds position end - 1 - ((end - 1 - s) mod S) (end =
    input_pos + t; negative: not written in this sequence), and `custom_sdpa` attends through the
    mask of what each query may see there (a stale slot from an earlier sequence is never read,
    so no reset is needed between sequences). With `image` (a flag [1], 1 when the chunk is one
    image view) the chunk's tokens also see each other's later tokens, as Gemma 3's views do."""

    def __init__(self, cfg, input_pos: torch.Tensor, t: int, image: torch.Tensor | None = None):
        self.cfg, self.t, self.image = cfg, t, image
        self.input_pos = input_pos
        self.start = input_pos[0].item()
        torch._check(self.start >= 0)
        self.q_pos = input_pos + torch.arange(t, dtype=input_pos.dtype)
        self.rings: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _ring(self, size: int):
        """Write slots [1, t] and the additive mask [t, size] of a local ring of `size` slots."""
        if size not in self.rings:
            end = self.input_pos + self.t
            slots = torch.arange(size, dtype=self.input_pos.dtype)
            # the dividend kept >= 0: ExecuTorch's portable remainder takes the dividend's sign
            k_pos = end - 1 - torch.remainder(end - 1 - slots + size, size)
            diff = self.q_pos[:, None] - k_pos[None, :]
            ok = (k_pos[None, :] >= 0) & (diff >= 0) & (diff < self.cfg.sliding_window)
            if self.image is not None:
                ok = ok | ((self.image > 0) & (k_pos >= self.input_pos))[None, :]
            self.rings[size] = (torch.remainder(self.q_pos, size).reshape(1, self.t),
                                torch.where(ok, 0.0, NEG_INF).to(torch.float32))
        return self.rings[size]

    def __call__(self, q, k, v, k_cache, v_cache, is_global, scale):
        cfg, t = self.cfg, self.t
        q = q.view(1, t, cfg.num_heads, cfg.head_dim)
        k = k.view(1, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(1, t, cfg.num_kv_heads, cfg.head_dim)
        if isinstance(k_cache, Int8Cache):
            return self._int8(q, k, v, k_cache, v_cache, is_global, scale)
        if k_cache.dtype != q.dtype:  # fp16 caches: the kernels run on fp16 queries, keys and values
            out, k_cache, v_cache = self(q.to(k_cache.dtype), k.to(k_cache.dtype), v.to(k_cache.dtype),
                                         k_cache, v_cache, is_global, scale)
            return out.to(q.dtype), k_cache, v_cache
        sdpa = torch.ops.llama.custom_sdpa
        if is_global:
            torch.ops.llama.update_cache(k, k_cache, self.start)
            torch.ops.llama.update_cache(v, v_cache, self.start)
            out = sdpa(q, k_cache, v_cache, self.start, None, 0.0, True, scale)
            if self.image is not None:  # an image view: every token sees the whole chunk
                whole = sdpa(q, k_cache, v_cache, self.start, None, 0.0, False, scale)
                out = out + self.image.to(out.dtype) * (whole - out)
        else:
            slots, mask = self._ring(k_cache.shape[1])
            torch.ops.llama.update_cache_with_indices(k, k_cache, 0, slots)
            torch.ops.llama.update_cache_with_indices(v, v_cache, 0, slots)
            out = sdpa(q, k_cache, v_cache, 0, mask, 0.0, False, scale)
        return out.reshape(1, t, cfg.q_dim), k_cache, v_cache

    def _int8(self, q, k, v, k_cache: Int8Cache, v_cache: Int8Cache, is_global, scale):
        """The same attention over int8 caches: the chunk's keys and values quantized per token and
        head into the caches (codes, scales and zero points written at the same slots), the queries
        likewise, and custom_quantized_sdpa reading the codes (model.int8_per_token in PyTorch)."""
        q, q_scales, q_zeros = _int8_per_token(q)
        if is_global:
            for value, cache in ((k, k_cache), (v, v_cache)):
                for part, buffer in zip(_int8_per_token(value), cache):
                    torch.ops.llama.update_cache(part, buffer, self.start)
            start, mask, causal = self.start, None, True
        else:
            slots, mask = self._ring(k_cache.codes.shape[1])
            for value, cache in ((k, k_cache), (v, v_cache)):
                for part, buffer in zip(_int8_per_token(value), cache):
                    torch.ops.llama.update_cache_with_indices(part, buffer, 0, slots)
            start, causal = 0, False

        def sdpa(is_causal):
            return torch.ops.llama.custom_quantized_sdpa(
                q, k_cache.codes, v_cache.codes, start, mask, 0.0, is_causal, scale,
                q_zeros, q_scales, k_cache.zeros, k_cache.scales, v_cache.zeros, v_cache.scales)

        out = sdpa(causal)
        if is_global and self.image is not None:  # an image view: every token sees the whole chunk
            out = out + self.image.to(out.dtype) * (sdpa(False) - out)
        return out.reshape(1, self.t, self.cfg.q_dim), k_cache, v_cache


def _int8_per_token(x):
    """(codes int8, scales float32, zero points int8) per row of x's last dimension, as the
    quantized kernels take them."""
    codes, scales, zeros = int8_codes_per_token(x)
    return codes, scales.to(torch.float32), zeros.to(torch.int8)


class _Forward(nn.Module):
    """The LLM runner's entry point: `forward(tokens int64 [1, T], input_pos int64 [1])` -> the
    last token's logits [1, 1, V] (every token's, [1, T, V], with `all_logits`: the debug `score`),
    T from 1 (decode) to the prefill length, over the shared cache buffers. ExecuTorch's runner
    feeds int64; XNNPACK takes int32, so the cast is the program's first op."""

    def __init__(self, model, cache: _Cache, all_logits: bool = False):
        super().__init__()
        self.model, self.cache, self.all_logits = model, cache, all_logits
        self.names = cache_names(model.cfg.num_layers)

    def forward(self, tokens, input_pos):
        t = tokens.shape[1]
        tokens, pos = tokens.to(torch.int32), input_pos.to(torch.int32)
        length = torch.full((1,), t, dtype=torch.int32)
        caches = self.cache.entries()
        logits, _ = self.model.step(tokens, pos, length, caches, all_logits=self.all_logits,
                                    attention=CacheOpsAttention(self.model.cfg, input_pos, t))
        return logits


class _TokenEmbedding(nn.Module):
    """MultimodalRunner's `token_embedding`: tokens int64 [1, T] -> the scaled embeddings [1, T, hidden]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.embed(tokens.to(torch.int32))


class _TextDecoder(nn.Module):
    """MultimodalRunner's `text_decoder`: embeddings [1, T, hidden] at input_pos int64 [1] ->
    the last position's logits [1, 1, V] over the shared cache (all the runner samples from; the
    head over a 256-token image view would cost more than the rest of the chunk on a small model).
    Text is causal; after `set_image_chunk(1)` the next
    chunk is one image view whose tokens attend to each other, as Gemma 3 wants, and the flag
    falls back to 0 (writing it also keeps it a shared mutable buffer rather than a constant). A
    runner that never sets it (the stock MultimodalRunner) gets causal image tokens."""

    def __init__(self, model, cache: _Cache):
        super().__init__()
        self.model, self.cache = model, cache
        self.names = cache_names(model.cfg.num_layers)

    def forward(self, embeddings, input_pos):
        t = embeddings.shape[1]
        pos = input_pos.to(torch.int32)
        length = torch.full((1,), t, dtype=torch.int32)
        caches = self.cache.entries()
        attention = CacheOpsAttention(self.model.cfg, input_pos, t, image=self.cache.image_chunk)
        logits, _ = self.model.decode(embeddings.to(self.model.dtype), pos, length, caches, all_logits=False,
                                      attention=attention)
        self.cache.image_chunk.copy_(torch.zeros_like(self.cache.image_chunk))
        return logits


class _ImageChunk(nn.Module):
    def __init__(self, cache: _Cache):
        super().__init__()
        self.cache = cache

    def forward(self, flag):
        self.cache.image_chunk.copy_(flag)
        return flag + 0


class _Reset(nn.Module):
    """Zero the shared cache buffers (for drivers that reuse a loaded program across unrelated
    sequences). A fresh program needs no reset: runtimes zero-fill planned memory, and the sliding
    cache masks every slot that a sequence has not written yet."""

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


def _export_methods(model, job, progress, vision=None) -> tuple[dict, dict]:
    """torch.export of every method (non-strict: strict tracing copies every weight)."""
    require("executorch.extension.llm.custom_ops.custom_ops", "pte")  # the cache kernels' export forms
    if model.kv_dtype == "int8":  # the out variants of the per-token quantize ops the int8 caches use
        require("executorch.kernels.quantized", "pte")
    cache = _Cache(model, _chunk(model, job, vision), images=vision is not None)
    t = job.prefill_len
    chunk = torch.export.Dim("chunk", min=1, max=t)
    inputs = {"tokens": torch.zeros(1, t, dtype=torch.int64), "input_pos": torch.zeros(1, dtype=torch.int64)}
    progress(f"torch.export {FORWARD} (T = 1..{t})")
    with torch.no_grad():
        programs = {FORWARD: torch.export.export(_Forward(model, cache), tuple(inputs.values()),
                                                 dynamic_shapes=({1: chunk}, None), strict=False)}
        programs[RESET] = torch.export.export(_Reset(cache), (torch.zeros(1, dtype=torch.int32),), strict=False)
    io = {FORWARD: {"chunk": f"1..{t}", **describe_io(inputs, sample_outputs(model, 1, with_cache=False))}}
    if job.debug_outputs:
        progress(f"torch.export {SCORE} (debug, T = 1..{t})")
        with torch.no_grad():
            programs[SCORE] = torch.export.export(_Forward(model, cache, all_logits=True), tuple(inputs.values()),
                                                  dynamic_shapes=({1: chunk}, None), strict=False)
        io[SCORE] = {"chunk": f"1..{t}", **describe_io(inputs, sample_outputs(model, t, with_cache=False))}
        progress(f"torch.export {HIDDEN} (debug, T={t})")
        tokens, length = torch.zeros(1, t, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
        with torch.no_grad():
            programs[HIDDEN] = torch.export.export(_Hidden(model), (tokens, length), strict=False)
    if vision is not None:
        programs.update(_image_methods(model, vision, cache, job, progress, io))
    return programs, io


def _chunk(model, job, vision) -> int:
    """The longest chunk any method takes: the prefill length, or one image view."""
    return max(job.prefill_len, vision.cfg.tokens_per_image) if vision is not None else job.prefill_len


def _export_vision(vision, pixels):
    """The tower with GELU written out: XNNPACK's own GELU puts a 27-layer tower 2e-4 of its
    largest value away from PyTorch, the written-out formula 5e-7 (the tower runs once per image)."""
    with plain_forms(vision):
        return torch.export.export(vision, (pixels,), strict=False)


def _image_methods(model, vision, cache: _Cache, job, progress, io: dict) -> dict:
    """The MultimodalRunner's methods over the same cache buffers as `forward`; text_decoder's
    chunk reaches one image view (tokens_per_image) even when the prefill length is shorter."""
    vc, h = vision.cfg, model.cfg.hidden_size
    t = max(job.prefill_len, vc.tokens_per_image)
    chunk = torch.export.Dim("chunk", min=1, max=t)
    pixels = torch.zeros(1, 3, vc.image_size, vc.image_size)
    tokens = torch.zeros(1, t, dtype=torch.int64)
    embeds, pos = torch.zeros(1, t, h), torch.zeros(1, dtype=torch.int64)
    flag = torch.zeros(1, dtype=torch.int32)
    progress(f"torch.export {VISION}, {EMBED}, {DECODER} (T = 1..{t}) and {IMAGE_CHUNK}")
    with torch.no_grad():
        programs = {
            VISION: _export_vision(vision, pixels),
            EMBED: torch.export.export(_TokenEmbedding(model), (tokens,), dynamic_shapes=({1: chunk},), strict=False),
            DECODER: torch.export.export(_TextDecoder(model, cache), (embeds, pos),
                                         dynamic_shapes=({1: chunk}, None), strict=False),
            IMAGE_CHUNK: torch.export.export(_ImageChunk(cache), (flag,), strict=False),
        }
    io[VISION] = describe_io({"pixels": pixels}, {"embeddings": torch.zeros(1, vc.tokens_per_image, h)})
    io[EMBED] = {"chunk": f"1..{t}", **describe_io({"tokens": tokens}, {"embeddings": embeds})}
    io[DECODER] = {"chunk": f"1..{t}", **describe_io({"embeddings": embeds, "input_pos": pos},
                                                     sample_outputs(model, 1, with_cache=False))}
    io[IMAGE_CHUNK] = describe_io({"flag": flag}, {"flag": flag})
    return programs


def runner_metadata(model, job, vocab) -> dict:
    """The constant methods ExecuTorch's LLM runner reads: the prefill chunk it may pass
    (`get_max_seq_len`), the context, the stop tokens and how the cache is driven."""
    cfg = model.cfg
    return {
        "get_max_seq_len": job.prefill_len,
        "get_max_context_len": job.max_context,
        "get_vocab_size": cfg.vocab_size,
        "get_bos_id": vocab.bos_id,
        "get_eos_ids": list(vocab.stop_ids),
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_n_layers": cfg.num_layers,
    }


def _lower_and_write(programs: dict, metadata: dict, workdir: Path, progress) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    for ep in programs.values():
        _drop_unused_buffers(ep)
        _tag_table_for_delegate(ep)
    progress("lowering to XNNPACK")
    with _share_weights_on_deepcopy():
        edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()],
                                           constant_methods=metadata)
    programs.clear()  # delegated weights now live in XNNPACK's serialized data; free the float copies
    gc.collect()
    progress("emitting ExecuTorch program")
    program = edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
        emit_mutable_buffer_names=True,
        external_constants=lambda node: DATA_TAG if _is_table(node.name) else None,
    ))
    del edge
    gc.collect()
    progress(f"writing {FILE} and {DATA_TAG}.ptd")
    with (workdir / FILE).open("wb") as f:
        program.write_to_file(f)
    program.write_tensor_data_to_file(str(workdir))
    if not (workdir / f"{DATA_TAG}.ptd").exists():
        raise ArtifactError(f"ExecuTorch wrote no {DATA_TAG}.ptd for the token table")


@contextmanager
def _share_weights_on_deepcopy(min_bytes: int = 1 << 16):
    """Make deepcopy share large plain tensors instead of copying them.

    ExecuTorch deep-copies each whole program in `to_edge` and again per delegated partition
    before XNNPACK serializes it, one full copy of the weights each time. The passes build new
    tensors rather than writing into weights, so the copies can share storage; the parity tests
    check the result against eager PyTorch.
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


def _is_table(name: str) -> bool:
    # the tied parameter may come out of lowering under either of its names
    return family.TABLE in name or family.HEAD in name


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


def read_named_data(folder: Path, manifest: Manifest) -> dict[str, bytes]:
    """Every named blob of the artifact (XNNPACK's weights and scales, the external token table),
    by key, from the .pte and its .ptd."""
    from executorch.exir._serialize._cord import Cord
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    prog = manifest.program
    pte = deserialize_pte_binary((folder / prog["file"]).read_bytes())
    out = {}
    if pte.named_data is not None:
        out.update({k: bytes(pte.named_data.buffers[e.buffer_index]) for k, e in pte.named_data.pte_data.items()})
    if prog.get("external_data"):
        ptd = FlatTensorSerializer().deserialize(Cord((folder / prog["external_data"]).read_bytes()))
        out.update({k: bytes(ptd.buffers[e.buffer_index]) for k, e in ptd.named_data.items()})
    return out


def _step_args(tokens: np.ndarray, pos: int) -> list[torch.Tensor]:
    """forward's / score's inputs as the LLM runner passes them: int64 tokens [1, T], input_pos [1]."""
    return [torch.from_numpy(tokens).to(torch.int64), torch.tensor([pos], dtype=torch.int64)]


class PteSession(BaseSession):
    """The program driven exactly as ExecuTorch's LLM runner drives it: `forward` with int64 tokens
    at their own length (no padding) and the position of the first. A prefill that wants every
    position's logits runs `score` on the same caches; an artifact without it (--no-debug-outputs)
    runs the chunk's tokens through `forward` one at a time, the same numbers step by step."""

    pads_prefill = False
    etdump = False  # record every operator's time (benchmarks.profile reads it)

    def __init__(self, folder: Path, manifest: Manifest, threads: int):
        runtime = require("executorch.runtime", "pte")
        require("executorch.extension.llm.custom_ops.custom_ops", "pte")  # registers the cache kernels
        pool = require("executorch.extension.pybindings.portable_lib", "pte")
        if manifest.kv_dtype == "int8":  # the per-token quantize kernels the int8 caches are written with
            require("executorch.kernels.quantized", "pte")
        # XNNPACK's kernels run on ExecuTorch's process-wide pool, which otherwise has one thread
        # per core whatever --threads says; a process runs one session at a time
        with quiet.native_info_lines():  # the pool's first use logs its cpu probing, a reset logs itself
            if threads > 0 and pool._threadpool_get_thread_count() != threads:
                pool._unsafe_reset_threadpool(threads)
        path = folder / manifest.program["file"]
        data = manifest.program.get("external_data")
        try:
            with quiet.native_info_lines():
                self._program = runtime.Runtime.get().load_program(str(path), data_path=str(folder / data) if data else None,
                                                                   enable_etdump=self.etdump)
                self._methods = {m: self._program.load_method(m) for m in (FORWARD, RESET)}
                self._scores = SCORE in self._program.method_names
        except Exception as e:
            raise ArtifactError(f"{path}: ExecuTorch could not load the program ({e})") from None
        self.info = session_info(manifest)
        self.reset()

    def reset(self) -> None:
        self._methods[RESET].execute([torch.zeros(1, dtype=torch.int32)])

    def _run(self, tokens, pos, n, decode):
        if decode:
            return self._run_last(tokens, pos, 1)[None]
        if not self._scores:
            return np.stack([self._run_last(tokens[:, i:i + 1], pos + i, 1) for i in range(n)])
        return self._method(SCORE).execute(_step_args(tokens, pos))[0][0].numpy()

    def _run_last(self, tokens, pos, n):
        return self._methods[FORWARD].execute(_step_args(tokens, pos))[0][0, -1].numpy()

    def _method(self, name: str):
        if name not in self._methods:
            self._methods[name] = self._program.load_method(name)
        return self._methods[name]

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self._method(VISION).execute([torch.from_numpy(np.ascontiguousarray(pixels, np.float32))])[0][0].numpy()

    def _run_embeddings(self, embeddings: np.ndarray, pos: int, image: bool) -> np.ndarray:
        if image:
            self._method(IMAGE_CHUNK).execute([torch.ones(1, dtype=torch.int32)])
        args = [torch.from_numpy(np.ascontiguousarray(embeddings[None], np.float32)), torch.tensor([pos], dtype=torch.int64)]
        return self._method(DECODER).execute(args)[0][0].numpy()

    def _hidden(self, tokens, n):
        if HIDDEN not in self._methods:
            if HIDDEN not in self._program.method_names:
                raise UnsupportedError("this artifact was exported with --no-debug-outputs; re-export it to locate")
            self._methods[HIDDEN] = self._program.load_method(HIDDEN)
        padded = np.zeros((1, self.info.prefill_len), np.int32)
        padded[:, :n] = tokens[:, :n]
        args = [torch.from_numpy(padded), torch.tensor([n], dtype=torch.int32)]
        return self._methods[HIDDEN].execute(args)[0].numpy()
