"""ONNX as an onnxruntime-genai model folder: one graph with a dynamic chunk length serves
prefill (T tokens) and decode (T = 1), with `genai_config.json` and the tokenizer beside it.

The graph speaks onnxruntime-genai's decoder interface: `input_ids` int64 [1, T],
`attention_mask` int64 [1, past + T] (its length gives the position), `past_key_values.{i}.key` /
`.value` in and `present.{i}.key` / `.value` out, `logits` [1, 1, V]: the head runs on the chunk's
last position only, which is all genai reads (see _last_position_head). With debug outputs,
score.onnx is the same graph with every position's logits and the hidden states, for teacher-forced
verification and --locate; it reads the same external data. genai binds each present to
the same buffer as its past (`past_present_share_buffer`) and sizes local layers' buffers as the
window plus `cache_slack` slots (the `sliding_window` block). Attention is onnxruntime's
GroupQueryAttention, which writes the new keys and values into those buffers in place (local
layers' as a sliding window it shifts when full) and reads only the positions in use, so a step
costs what the conversation holds, not the context. Weights are stored once, as external data;
quantized weights are the PyTorch codes, as MatMulNBits weights or DequantizeLinear inputs. Our
session drives the graph the way genai does, one shared OrtValue per cache.

A model with a vision encoder gets genai's vision-model layout instead: vision.onnx (pixels ->
image features), embedding.onnx (token ids + features -> embeddings) and a decoder that takes the
embeddings and the token ids, whose runs of image tokens attend both ways (see _Graph._step).
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path

import numpy as np
import torch

from ..artifact import Manifest, versions
from ..errors import ArtifactError, ExportError, UnsupportedError
from ..gemma3 import family
from ..gemma3.images import ImageSettings
from ..gemma3.model import NEG_INF, plain_forms, rotate_half
from ..gemma3.vision import image_groups
from ..quant.packing import pack_int4, unpack_int4
from ..session import BaseSession
from ..trace import HIDDEN, cache_names, float_twin, release_weights
from .base import Exported, Lowering, Runner, Stock, match_weights, require, session_info

FILE = "model.onnx"
DATA = "model.onnx.data"
OPSET = 18
QUANT_OPSET = 21  # blocked DequantizeLinear and INT4 tensors
TABLE = f"{family.TABLE}.weight"
CONFIG = "genai_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # genai's image preprocessing
TOKENIZER_CONFIG = "tokenizer_config.json"  # genai's tokenizer does not load without it
# genai's local buffers hold window + cache_slack slots; the attention kernel shifts a full buffer
# by the slack at once, so a larger slack moves the cache less often (16 is genai's CPU default)
SLACK = 16
FORWARD = "decoder"
SCORE, SCORE_FILE = "score", "score.onnx"  # debug: the decoder with every position's logits
# image prompts, as onnxruntime-genai's vision models split them: pixels -> image features
# (vision), token ids + features -> embeddings (embedding), embeddings -> logits (the decoder)
VISION, VISION_FILE = "vision", "vision.onnx"
EMBEDDING, EMBEDDING_FILE = "embedding", "embedding.onnx"


def genai_names(num_layers: int) -> list[str]:
    """genai's cache names, in the model's flat order [k0, v0, k1, v1, ...]."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_name(past: str) -> str:
    return past.replace("past_key_values.", "present.")


@torch.library.custom_op("gemma_export::group_query_attention", mutates_args=())
def _gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
         seqlens_k: torch.Tensor, total: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
         kv_heads: int, scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """onnxruntime's GroupQueryAttention, as a placeholder op for tracing: it exists only in the
    exported graph (the PyTorch model keeps its own attention)."""
    raise UnsupportedError("group_query_attention runs only inside onnxruntime")


@_gqa.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads, scale, window):
    return q.new_empty(q.shape), torch.empty_like(past_k), torch.empty_like(past_v)


@torch.library.custom_op("gemma_export::group_query_attention_masked", mutates_args=())
def _gqa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                seqlens_k: torch.Tensor, total: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                num_heads: int, kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention on a full-length buffer with our own mask (an additive bias [1, 1, T,
    total]) in place of its causal one: a placeholder for tracing, like _gqa."""
    raise UnsupportedError("group_query_attention runs only inside onnxruntime")


@_gqa_masked.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, bias, num_heads, kv_heads, scale):
    return q.new_empty(q.shape), torch.empty_like(past_k), torch.empty_like(past_v)


def _gqa_onnx(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads, scale, window):
    """com.microsoft GroupQueryAttention: K/V written into the past buffers at the sequence's
    position (present shares the buffer), the queries attend to what is in use. A local layer's
    buffer is window + slack slots (`sliding_window_cache`): the kernel keeps the last positions.
    RoPE is the kernel's too (`do_rotary`, half-split as in rotate_half), from cos/sin tables of the
    layer type's base, at the positions seqlens_k implies."""
    from onnxscript import values

    gqa = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())
    ring = {"sliding_window_cache": 1} if window > 0 else {}
    return gqa(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads=num_heads, kv_num_heads=kv_heads,
               scale=scale, local_window_size=window, do_rotary=1, rotary_interleaved=0, _outputs=3, **ring)


def _gqa_masked_onnx(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, bias, num_heads, kv_heads, scale):
    """GroupQueryAttention with causal=0 and our mask as its attention_bias (no position_ids)."""
    from onnxscript import values

    gqa = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())
    return gqa(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, None, bias, num_heads=num_heads,
               kv_num_heads=kv_heads, scale=scale, local_window_size=-1, do_rotary=1, rotary_interleaved=0, causal=0,
               _outputs=3)


@functools.cache
def _gqa_schema():
    """The part of onnxruntime's GroupQueryAttention signature we use (onnx ships no schema for
    contrib ops, and onnxscript builds a node only from one)."""
    from onnx.defs import OpSchema

    p = OpSchema.FormalParameter
    t, m = "T", "M"
    attrs = [OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in
             ("num_heads", "kv_num_heads", "local_window_size", "do_rotary", "rotary_interleaved",
              "sliding_window_cache", "causal")]
    attrs.append(OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""))
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[p("query", t), p("key", t), p("value", t), p("past_key", t), p("past_value", t),
                p("seqlens_k", m), p("total_sequence_length", m), p("cos_cache", t), p("sin_cache", t),
                p("position_ids", "P", param_option=OpSchema.FormalParameterOption.Optional),
                p("attention_bias", t, param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[p("output", t), p("present_key", t), p("present_value", t)],
        type_constraints=[(t, ["tensor(float)", "tensor(float16)"], ""), (m, ["tensor(int32)"], ""),
                          ("P", ["tensor(int64)"], "")],
        attributes=attrs)


def _resident(t: torch.Tensor, capacity: int, window: int) -> torch.Tensor:
    """How many positions a windowed GroupQueryAttention buffer holds after `t` tokens: all of them
    up to its capacity, then it evicts capacity - window + 1 at a time (the op's documented layout:
    rows [0, L) hold the L most recent positions in order)."""
    g = capacity - window + 1
    over = torch.clamp(t - capacity, min=0)
    return t - g * ((over + g - 1) // g)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """[1, T, heads*d] -> [1, heads, T, d] rotated as the kernel's half-split RoPE (cos/sin [T, d/2])."""
    b, t, _ = x.shape
    x = x.view(b, t, heads, -1).transpose(1, 2)
    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    return x * cos + rotate_half(x) * sin


def _chunk_mask(groups: torch.Tensor, window: int | None) -> torch.Tensor:
    """[T, T] bool: which of a chunk's tokens each of its tokens sees. Causal (within the window on
    a local layer), and an image view's tokens (the same group >= 0) see each other."""
    t = groups.shape[0]
    i = torch.arange(t, dtype=groups.dtype)
    diff = i[:, None] - i[None, :]
    ok = diff >= 0
    if window is not None:
        ok = ok & (diff < window)
    return ok | ((groups[:, None] == groups[None, :]) & (groups[:, None] >= 0))


def _local_images(q, k, v, past_k, past_v, pos, groups, cos_table, sin_table, heads: int, kv_heads: int,
                  scale: float, window: int):
    """A local layer's attention for a chunk holding image views, on a windowed GroupQueryAttention
    buffer: the kernel masks causally whenever it windows, so the chunk is computed here from the
    resident rows and the new keys, and the buffer is rewritten in the kernel's own layout so that
    the steps after it run on GroupQueryAttention again."""
    b, t, _ = q.shape
    capacity, d = past_k.shape[2], past_k.shape[3]
    positions = pos + torch.arange(t, dtype=pos.dtype)
    cos, sin = cos_table.index_select(0, positions), sin_table.index_select(0, positions)
    keys = torch.cat((past_k, _rotate(k, cos, sin, kv_heads)), 2)  # [1, kv, C + T, d]
    values = torch.cat((past_v, v.view(b, t, kv_heads, d).transpose(1, 2)), 2)
    held = _resident(pos, capacity, window)
    rows = torch.arange(capacity, dtype=pos.dtype)
    past_pos = pos - held + rows  # the position in each row (rows >= held are stale)
    ok = (rows[None, :] < held) & (positions[:, None] - past_pos[None, :] < window)
    ok = torch.cat((ok, _chunk_mask(groups, window)), 1)
    rep = heads // kv_heads
    mask = torch.where(ok, 0.0, NEG_INF).to(q.dtype).repeat(rep, 1)
    qg = (_rotate(q, cos, sin, heads) * scale).reshape(b, kv_heads, rep * t, d)
    probs = torch.softmax(torch.matmul(qg, keys.transpose(2, 3)) + mask, dim=-1)
    out = torch.matmul(probs, values).reshape(b, heads, t, d).transpose(1, 2).reshape(b, t, heads * d)
    # the layout after the chunk: rows [0, L) hold the L most recent positions
    end = pos + t
    latest = end - _resident(end, capacity, window) + rows
    index = torch.where(latest >= pos, capacity + latest - pos, latest - pos + held).clamp(0, capacity + t - 1)
    return out, keys.index_select(2, index), values.index_select(2, index)


class _Graph(torch.nn.Module):
    """One step in genai's interface. The caches come as one list argument: torch.onnx's dynamo
    exporter takes per-layer caches only that way (as separate positional arguments they fail its
    dynamic-shape check). Attention is onnxruntime's GroupQueryAttention on the shared buffers."""

    def __init__(self, model, hidden: bool, image_token_id: int | None = None):
        super().__init__()
        self.model, self.hidden, self.image_token_id = model, hidden, image_token_id
        # RoPE tables for GroupQueryAttention, one pair per layer type, every position of the context
        for kind, is_global in (("local", False), ("global", True)):
            cos, sin = model.rope_tables(is_global, model.max_context)
            self.register_buffer(f"cos_cache_{kind}", cos, persistent=False)
            self.register_buffer(f"sin_cache_{kind}", sin, persistent=False)

    def forward(self, input_ids, attention_mask, caches: list):
        return self._step(self.model.embed(input_ids.to(torch.int32)), attention_mask, caches)

    def _step(self, x, attention_mask, caches: list, input_ids=None):
        cfg = self.model.cfg
        t = x.shape[1]
        pos = torch.full((1,), attention_mask.shape[1] - t, dtype=torch.int32)
        length = torch.full((1,), t, dtype=torch.int32)
        total = pos[0] + t  # GroupQueryAttention's total_sequence_length (scalar) and seqlens_k = total - 1
        seqlens = pos + (t - 1)
        heads, kv = cfg.num_heads, cfg.num_kv_heads
        if input_ids is not None:  # a chunk with image tokens: its views attend both ways
            images = (input_ids[0] == self.image_token_id).any()
            groups = image_groups(input_ids[0], self.image_token_id).to(torch.int32)

        def attention(q, k, v, k_cache, v_cache, is_global, scale):
            window, kind = (-1, "global") if is_global else (cfg.sliding_window, "local")
            args = (q, k, v, k_cache, v_cache, seqlens, total, getattr(self, f"cos_cache_{kind}"),
                    getattr(self, f"sin_cache_{kind}"))

            def text(*a):
                return _gqa(*a[:9], heads, kv, scale, window)

            if input_ids is None:
                return text(*args)

            # the mask's width comes from attention_mask's shape (an operand: its length is symbolic)
            def with_images(q, k, v, k_cache, v_cache, seqlens, total, cos, sin, attention_mask, groups):
                t = q.shape[1]
                start = seqlens - (t - 1)
                if is_global:  # a full-length buffer: the kernel itself, with our mask as its bias
                    past = torch.ones(t, attention_mask.shape[1] - t, dtype=torch.bool)
                    ok = torch.cat((past, _chunk_mask(groups, None)), 1)
                    bias = torch.where(ok, 0.0, NEG_INF).to(q.dtype)[None, None]
                    return _gqa_masked(q, k, v, k_cache, v_cache, seqlens, total, cos, sin, bias, heads, kv, scale)
                return _local_images(q, k, v, k_cache, v_cache, start, groups, cos, sin, heads, kv, scale, window)

            return torch.cond(images, with_images, text, (*args, attention_mask, groups))

        attention.rotary = True  # q and k come before RoPE

        out = self.model.decode(x, pos, length, caches, hidden=self.hidden, attention=attention)
        return (out[0], *out[1], *out[2:])


class _ImageGraph(_Graph):
    """The decoder as genai's vision models drive it: embeddings in (the embedding graph places the
    image features among the text's), and the token ids beside them, which genai feeds too: a
    chunk's runs of image tokens are image views whose tokens see each other, as Gemma 3 wants."""

    def forward(self, inputs_embeds, attention_mask, input_ids, caches: list):
        return self._step(inputs_embeds, attention_mask, caches, input_ids)


class _Embedding(torch.nn.Module):
    """genai's embedding graph: token ids and the images' features -> the decoder's embeddings, the
    image tokens' rows taken in order from the features (none on a text-only step)."""

    def __init__(self, model, image_token_id: int):
        super().__init__()
        self.model, self.image_token_id = model, image_token_id

    def forward(self, input_ids, image_features):
        ids = input_ids[0]
        is_image = ids == self.image_token_id
        text = self.model.embed(torch.where(is_image, 0, ids).to(torch.int32)[None])[0]
        # one zero row after the features, so the gather has a row to read when there are none
        rows = torch.cat((image_features.reshape(-1, text.shape[-1]), text.new_zeros(1, text.shape[-1])))
        at = (torch.cumsum(is_image.to(torch.int64), 0) - 1).clamp(0, rows.shape[0] - 1)
        return torch.where(is_image[:, None], rows.index_select(0, at), text)[None]


class OnnxBackend:
    name = "onnx"
    # DequantizeLinear / MatMulNBits of the codes (per channel or blocked, INT8/INT4); activation
    # quantization as float ops that compute exactly the PyTorch reference
    # zero points: MatMulNBits takes float ones at 4 bits (onnxruntime's CPU kernel refuses them at 8)
    lowering = Lowering(frozenset({(8, "channel"), (8, "block"), (4, "channel"), (4, "block")}),
                        frozenset({"float", "int8-dynamic", "int8-static", "int16-static"}),
                        blocks=frozenset({16, 32, 64, 128}), asymmetric=frozenset({4}))
    runner = Runner("GEMMA_ONNX_RUNNER",
                    "onnxruntime-genai's model-generate example (model_generate / model-qa, built\n"
                    "from onnxruntime-genai/examples/c), run on the artifact folder as\n"
                    "$GEMMA_ONNX_RUNNER -m . (it reads genai_config.json and the tokenizer there)",
                    stock_args=("-m", "artifact", "-e", "cpu", "--prompt", "{prompt}", "--max_length", "{seq_len}",
                                "--greedy"))

    images = True  # vision and embedding graphs beside a decoder that takes embeddings

    def export(self, model, job, workdir: Path, progress, vocab, vision=None) -> Exported:
        onnx = require("onnx", self.name)
        require("onnxscript", self.name)
        # trace a float graph; quantized weights are put back below. Dynamic int8 activations (either
        # weight width) are left to MatMulNBits (see _accuracy_level)
        codes = float_twin(model, activation_ops=lambda scheme: not _runtime_quantizes(scheme))
        model.local_slack = SLACK
        cache_lengths = tuple(model.cache_lengths())
        _trace(model, job, workdir, progress, images=None if vision is None else vision.cfg.image_token_id)
        graphs = {FORWARD: FILE}
        if vision is not None:
            _trace_embedding(model, vision.cfg, workdir, progress)
            _trace_vision(vision, workdir, progress)
            graphs.update({EMBEDDING: EMBEDDING_FILE, VISION: VISION_FILE})
        _write_genai_config(workdir, model.cfg, job, vocab, None if vision is None else vision.cfg)
        release_weights(model)  # the graphs hold them now, on disk; `codes` keeps the quantized ones
        opset = OPSET
        if codes:
            progress(f"replacing {len(codes)} weights by DequantizeLinear of their integer codes")
            _lower_codes(workdir, codes)
            if vision is not None:  # the embedding graph gathers rows of the same quantized table
                _lower_codes(workdir, {TABLE: codes[TABLE]} if TABLE in codes else {}, EMBEDDING_FILE)
            opset = QUANT_OPSET
        _last_position_head(workdir, job.debug_outputs)
        if job.debug_outputs:
            graphs[SCORE] = SCORE_FILE
        entry_points = {}
        for name, file in graphs.items():
            data = _data(FILE if name == SCORE else file)  # the score graph reads the decoder's weights
            if not (workdir / data).is_file():
                raise ExportError(f"onnx export wrote no external data file {data}")
            progress(f"onnx.checker (full check of {file})")
            onnx.checker.check_model(str(workdir / file), full_check=True)
            if name == EMBEDDING:
                _unshape_input(workdir / file, "image_features")
            io = _io(onnx.load(str(workdir / file), load_external_data=False).graph)
            chunk = {"chunk": f"1..{job.max_context}"} if name in (FORWARD, SCORE) else {}
            entry_points[name] = {"graph": file, **chunk, **io}
        images = None
        if vision is not None:
            images = (vision.cfg, {"vision_encoder": VISION, "token_embedding": EMBEDDING, "text_decoder": FORWARD})
        return Exported(
            images=images,
            entry_points=entry_points,
            program={"file": FILE, "external_data": DATA, "opset": opset, "genai_config": CONFIG,
                     "kv_cache": "past_key_values.i -> present.i, one shared buffer each",
                     **({"graphs": sorted(graphs.values()),
                         "image_views": "the decoder's input_ids mark image tokens: each run of them attends both "
                                        "ways"} if vision is not None else {}),
                     "logits": "the chunk's last position",
                     "score_graph": SCORE_FILE if job.debug_outputs else None,
                     "debug_output": HIDDEN if job.debug_outputs else None, "quantized_weights": sorted(codes)},
            versions=versions("onnx", "onnxruntime", "onnxscript"), cache_lengths=cache_lengths)

    def open(self, folder: Path, manifest: Manifest, threads: int) -> "OnnxSession":
        return OnnxSession(folder, manifest, threads)

    def read_codes(self, folder: Path, manifest: Manifest) -> list[np.ndarray]:
        """The integer codes stored in the graph ([out, in] for MatMulNBits weights; as stored,
        possibly [in, out], for DequantizeLinear inputs)."""
        onnx = require("onnx", self.name)
        from onnx import numpy_helper

        model = onnx.load(str(folder / manifest.program["file"]))
        inits = {i.name: i for i in model.graph.initializer}
        # a fused MatMulNBits (q/k/v, gate/up) feeds a Split: its codes are the weights' rows in turn
        splits = {n.input[0]: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
                  if n.op_type == "Split" and len(n.input) > 1 and n.input[1] in inits}
        out = {}
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0].endswith(".codes"):
                out[node.output[0]] = numpy_helper.to_array(inits[node.input[0]])
            elif node.op_type == "MatMulNBits" and f"{node.input[1]}:0" not in out:
                attrs = {a.name: a.i for a in node.attribute}
                u = numpy_helper.to_array(inits[node.input[1]])  # [N, K/block, block*bits/8]
                n, k, bits = attrs["N"], attrs["K"], attrs["bits"]
                codes = (unpack_int4(u, offset=True) if bits == 4 else u.astype(np.int16) - 128).reshape(n, k)
                rows = splits.get(node.output[0], [n])
                for i, part in enumerate(np.split(codes.astype(np.int8), np.cumsum(rows)[:-1])):
                    out[f"{node.input[1]}:{i}"] = part
        return list(out.values())

    def declared_io(self, folder: Path, manifest: Manifest) -> dict[str, dict]:
        """Each graph's inputs and outputs (the weights are not read)."""
        onnx = require("onnx", self.name)
        from onnx import helper

        def load(file):
            try:
                return onnx.load(str(folder / file), load_external_data=False).graph
            except Exception as e:  # onnx raises DecodeError and others on a damaged file
                raise ArtifactError(f"{folder / file}: not a readable ONNX model ({e})") from None

        def describe(values):
            out = []
            for v in values:
                t = v.type.tensor_type
                shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
                out.append({"name": v.name, "shape": shape,
                            "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type))})
            return out

        files = {name: e.get("graph", manifest.program["file"]) for name, e in manifest.entry_points.items()}
        out = {}
        for name, file in (files or {FORWARD: manifest.program["file"]}).items():
            graph = load(file)
            out[name] = {"inputs": describe(graph.input), "outputs": describe(graph.output)}
        return out

    def stock_generate(self, folder: Path, manifest: Manifest, text: str, max_new_tokens: int) -> Stock:
        """Greedy text from onnxruntime-genai on the folder as shipped (its tokenizer adds no <bos>)."""
        folder = Path(folder)
        og = require("onnxruntime_genai", self.name)
        model = og.Model(str(folder))
        tok = og.Tokenizer(model)
        ids = [manifest.tokenizer.bos, *tok.encode(text).tolist()]
        params = og.GeneratorParams(model)
        # the graph's global caches are the context long, so genai's buffers must be too
        params.set_search_options(do_sample=False, max_length=manifest.max_context)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        stream, pieces, tokens, stop = tok.create_stream(), [], [], _stop_ids(folder)
        while not gen.is_done() and len(tokens) < max_new_tokens:
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in stop:
                break
            tokens.append(token)
            pieces.append(stream.decode(token))
        return Stock("".join(pieces), tuple(tokens))


BACKEND = OnnxBackend()


def _data(file: str) -> str:
    return f"{file}.data"  # where torch.onnx and _lower_codes put a graph's external weights


def _trace(model, job, workdir: Path, progress, images: int | None = None) -> None:
    """The decoder graph; with `images` (the image token id), the form that takes embeddings and
    the token ids beside them."""
    pasts = genai_names(model.cfg.num_layers)
    caches = model.new_cache()
    t = job.prefill_len
    # a whole prompt may come in one call (genai does not chunk), so T runs to the context
    chunk = torch.export.Dim("T", min=1, max=job.max_context)
    total = torch.export.Dim("total", min=1, max=job.max_context)
    mask = torch.ones(1, t, dtype=torch.int64)
    if images is not None:
        graph = _ImageGraph(model, hidden=job.debug_outputs, image_token_id=images).eval()
        sample = (torch.zeros(1, t, model.cfg.hidden_size, dtype=model.dtype), mask,
                  torch.zeros(1, t, dtype=torch.int64), caches)
        first, extra = "inputs_embeds", {"input_ids": {1: chunk}}
    else:
        graph = _Graph(model, hidden=job.debug_outputs).eval()
        sample, first, extra = (torch.zeros(1, t, dtype=torch.int64), mask, caches), "input_ids", {}
    dynamic = {first: {1: chunk}, "attention_mask": {1: total}, **extra, "caches": [None] * len(caches)}
    outputs = ["logits", *map(present_name, pasts)] + ([HIDDEN] if job.debug_outputs else [])
    progress("torch.onnx.export (dynamo)")
    with torch.no_grad(), plain_forms(model):
        program = torch.onnx.export(
            graph, sample, dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET, external_data=True,
            input_names=[first, "attention_mask", *extra, *pasts], output_names=outputs, optimize=True, verbose=False,
            custom_translation_table={torch.ops.gemma_export.group_query_attention.default: _gqa_onnx,
                                      torch.ops.gemma_export.group_query_attention_masked.default: _gqa_masked_onnx},
        )
    _fuse_norms(program.model)
    progress("saving graph and external weights")
    program.save(str(workdir / FILE), external_data=True)
    del program
    gc.collect()
    _drop_unused_constants(workdir / FILE)


def _drop_unused_constants(path: Path) -> None:
    """Constants no node reads (the exporter leaves a few): onnxruntime would warn about each at
    every load."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    read = {i for n in graph.node for i in _reads(n)} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in read]
    if len(kept) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
        onnx.save(model, str(path))


def _last_position_head(workdir: Path, debug: bool) -> None:
    """model.onnx computes the head for the chunk's last position only, as ExecuTorch's and
    LiteRT-LM's prefill entry points do: genai reads nothing else, and over every position of a
    prefill chunk the head (V x hidden, most of a small Gemma's weights) took most of the step.
    The traced graph, every position's logits and the hidden states, stays as score.onnx with debug
    outputs (teacher-forced verification, --locate); both name the same external data file."""
    import onnx
    from onnx import TensorProto, helper

    path = workdir / FILE
    model = onnx.load(str(path), load_external_data=False)
    if debug:
        onnx.save(model, str(workdir / SCORE_FILE))
    graph = model.graph
    heads = [n for n in graph.node if "logits" in n.output]
    if len(heads) != 1 or heads[0].op_type not in ("MatMul", "MatMulNBits"):
        found = ", ".join(n.op_type for n in heads) or "no node"
        raise ExportError(f"onnx: the logits come from {found}, not the head's MatMul; cannot cut it to the last position")
    (head,) = heads
    graph.initializer.extend([helper.make_tensor(f"last_position.{k}", TensorProto.INT64, [1], [v])
                              for k, v in (("starts", -1), ("ends", 2**62), ("axes", 1))])
    graph.node.insert(list(graph.node).index(head), helper.make_node(
        "Slice", [head.input[0], "last_position.starts", "last_position.ends", "last_position.axes"],
        ["last_position.hidden"], name="last_position"))
    head.input[0] = "last_position.hidden"
    (logits,) = [o for o in graph.output if o.name == "logits"]
    logits.type.tensor_type.shape.dim[1].dim_value = 1  # replaces the chunk's symbolic length
    for out in [o for o in graph.output if o.name == HIDDEN]:  # the debug output lives in score.onnx
        graph.output.remove(out)
    _drop_dead_nodes(graph)
    onnx.save(model, str(path))


def _drop_dead_nodes(graph) -> None:
    """Nodes and initializers no graph output depends on (the hidden states' stack, once that
    output is gone): onnxruntime would compute the nodes at every step."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _trace_embedding(model, vc, workdir: Path, progress) -> None:
    """embedding.onnx: input_ids int64 [1, T], image_features [N, tokens, hidden] (N = 0 on a text
    step) -> inputs_embeds [1, T, hidden]."""
    h = model.cfg.hidden_size
    chunk = torch.export.Dim("T", min=1, max=model.max_context)
    images = torch.export.Dim("images", min=0, max=max(2, model.max_context // vc.tokens_per_image))
    # shapes only: two images (one would pin their dimension to 1), a short chunk
    sample = (torch.full((1, 8), vc.image_token_id, dtype=torch.int64),
              torch.zeros(2, vc.tokens_per_image, h, dtype=model.dtype))
    progress("torch.onnx.export (dynamo) of the embedding graph")
    with torch.no_grad():
        program = torch.onnx.export(
            _Embedding(model, vc.image_token_id).eval(), sample, dynamic_shapes={"input_ids": {1: chunk},
                                                                                 "image_features": {0: images}},
            dynamo=True, opset_version=OPSET, external_data=True, input_names=["input_ids", "image_features"],
            output_names=["inputs_embeds"], optimize=True, verbose=False)
    program.save(str(workdir / EMBEDDING_FILE), external_data=True)
    del program
    gc.collect()


def _unshape_input(path: Path, name: str) -> None:
    """Declare an input with no shape: genai feeds the embedding graph image features [N, tokens,
    hidden] with images and [0, hidden] without, and onnxruntime checks a declared rank. (onnx's
    checker wants a shape, so this comes after it.)"""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    (value,) = [v for v in model.graph.input if v.name == name]
    value.type.tensor_type.ClearField("shape")
    onnx.save(model, str(path))


def _trace_vision(vision, workdir: Path, progress) -> None:
    """vision.onnx: pixel_values float32 [N, 3, S, S] -> image_features [N, tokens, hidden] (float:
    a recipe quantizes the text decoder only)."""
    s = vision.cfg.image_size
    progress("torch.onnx.export (dynamo) of the vision encoder")
    with torch.no_grad():
        program = torch.onnx.export(
            vision.eval(), (torch.zeros(2, 3, s, s),), dynamic_shapes={"pixels": {0: torch.export.Dim("images", min=1,
                                                                                                       max=64)}},
            dynamo=True, opset_version=OPSET, external_data=True, input_names=["pixel_values"],
            output_names=["image_features"], optimize=True, verbose=False)
    program.save(str(workdir / VISION_FILE), external_data=True)
    del program
    gc.collect()


def _fuse_norms(model) -> None:
    """Each residual Add feeding an RMSNorm becomes one com.microsoft SkipSimplifiedLayerNormalization
    (the sum is its extra output): onnxruntime fuses the norms at load but not the Add into them.
    The other norms go back to the textbook form, which onnxruntime fuses at load: its
    SimplifiedLayerNormalization sits in the default domain, which onnx's checker rejects."""
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    fuse_rms_normalization(model)
    fuse_skip_rms_normalization(model)
    pattern.RewriteRuleSet([_plain_rms_norm_rule()]).apply_to_model(model)
    model.graph.sort()  # a fused norm's sum may feed nodes placed before it


def _plain_rms_norm_rule():
    """SimplifiedLayerNormalization(x, w) (last axis, as onnxscript fuses it) -> x / sqrt(mean(x^2)
    + eps) * w, the form onnxruntime fuses at load (see _fuse_norms)."""
    from onnxscript.rewriter import pattern

    class PlainRmsNorm(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, scale):
            return op.SimplifiedLayerNormalization(x, scale, _allow_other_attributes=True, _outputs=["y"])

        def rewrite(self, op, x, scale, y, **_):
            eps = y.producer().attributes.get_float("epsilon", 1e-5)
            ms = op.ReduceMean(op.Pow(x, op.Constant(value_float=2.0)), op.Constant(value_ints=[-1]), keepdims=1)
            return op.Mul(op.Div(x, op.Sqrt(op.Add(ms, op.Constant(value_float=eps)))), scale)

    return PlainRmsNorm.rule()


def _write_genai_config(workdir: Path, cfg, job, vocab, vc=None) -> None:
    """genai_config.json (the model, its window and stop tokens for onnxruntime-genai) and the
    tokenizer_config.json its tokenizer needs, with the chat template. With a vision config `vc`,
    genai's vision-model layout: vision and embedding graphs, the decoder taking embeddings."""
    import json

    local = [i for i in range(cfg.num_layers) if not cfg.is_global(i)]
    config = {
        "model": {
            "type": "gemma3_text",
            "bos_token_id": vocab.bos_id, "eos_token_id": list(vocab.stop_ids), "pad_token_id": vocab.pad_id,
            "context_length": job.max_context, "vocab_size": cfg.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": FILE,
                "head_size": cfg.head_dim, "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
                "num_hidden_layers": cfg.num_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                # genai itself never moves cache contents: the attention kernel keeps each local window
                "sliding_window": {"window_size": cfg.sliding_window, "layers": local, "cache_slack": SLACK,
                                   "slide_key_value_cache": False, "slide_inputs": False},
            },
        },
        "search": {"do_sample": False, "max_length": job.max_context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
    if vc is not None:  # genai's vision-model pipeline: vision -> embedding -> decoder (given the ids too)
        model = config["model"]
        model["type"] = "gemma3"
        model["image_token_id"] = vc.image_token_id
        model["decoder"]["inputs"] = {"inputs_embeds": "inputs_embeds", **model["decoder"]["inputs"]}
        model["embedding"] = {"filename": EMBEDDING_FILE, "inputs": {"input_ids": "input_ids",
                                                                     "image_features": "image_features"},
                              "outputs": {"inputs_embeds": "inputs_embeds"}}
        model["vision"] = {"filename": VISION_FILE, "config_filename": PROCESSOR_CONFIG,
                           "inputs": {"pixel_values": "pixel_values"}, "outputs": {"image_features": "image_features"}}
        (workdir / PROCESSOR_CONFIG).write_text(json.dumps(_processor_config(ImageSettings(size=vc.image_size)),
                                                           indent=2))
    (workdir / CONFIG).write_text(json.dumps(config, indent=2))
    tokens = {k: v for k, v in family.SPECIAL_TOKENS.items() if k in ("bos", "eos", "pad")}
    (workdir / TOKENIZER_CONFIG).write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        **{f"{k}_token": v for k, v in tokens.items()},
        "model_max_length": job.max_context, "chat_template": family.CHAT_JINJA,
    }, indent=2))


def _processor_config(settings: ImageSettings) -> dict:
    """genai's image preprocessing (onnxruntime-extensions' pipeline): the manifest's settings,
    without pan-and-scan (genai has none); its resize is not Pillow's, so pixels differ slightly."""
    ops = [("decode_image", "DecodeImage", {"color_space": "RGB"}),
           ("resize", "Resize", {"interpolation": "LINEAR", "width": settings.size, "height": settings.size,
                                 "keep_aspect_ratio": 0}),
           ("rescale", "Rescale", {"rescale_factor": settings.rescale}),
           ("normalize", "Normalize", {"mean": list(settings.mean), "std": list(settings.std)}),
           ("to_channel_first", "Permute3D", {"dims": [2, 0, 1]})]
    return {"processor": {"name": "gemma_3_image_processing", "transforms": [
        {"operation": {"name": name, "type": kind, "attrs": attrs}} for name, kind, attrs in ops]}}


def _stop_ids(folder: Path) -> set[int]:
    import json

    return set(json.loads((folder / CONFIG).read_text())["model"]["eos_token_id"])


def _lower_codes(workdir: Path, codes: dict, file: str = FILE) -> None:
    """Replace each quantized weight's float initializer by its integer codes.

    The exporter may store a weight as given ([out, in]) or transposed ([in, out]); initializers
    are matched by their exact float values (codes x scales), so either layout is found.
    """
    import onnx
    from onnx import TensorProto, helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if not codes:
        return
    path = workdir / file
    # weights stay on disk: the float ones being replaced are only hashed, one at a time, from the file
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    floats = ((i.name, _stored_array(i, workdir)) for i in graph.initializer
              if i.data_type == TensorProto.FLOAT and len(i.dims) == 2)
    hits = match_weights(codes, floats, transposed=True)
    keep, matmuls = [], []
    for init in graph.initializer:
        if init.name not in hits:
            keep.append(init)
            continue
        name, layout = hits[init.name]
        q, s, scheme, z = codes[name]
        q, s = q.numpy(), s.numpy().astype(np.float32)
        z = None if z is None else z.numpy().astype(np.float32)
        users = _matmul_users(graph, init.name) if layout == "io" else []
        if z is not None and not (users and name != TABLE):  # the backend's lowering table refuses these
            raise ExportError(f"onnx: {name} has zero points and is not read by a MatMul alone")
        if name == TABLE and layout == "oi":  # gathered and used as the tied head
            keep += _lower_table(graph, init.name, q, s, scheme)
        elif users:  # x @ W^T: run it as MatMulNBits
            matmuls.append((init.name, users, q, s, scheme, z))
        else:
            keep += _dequantize_linear(graph, init.name, layout, q, s, scheme)
    keep += _lower_matmul_groups(graph, matmuls)
    # constants only the replaced nodes read (reshape shapes, ...): onnxruntime would drop them at
    # load with a warning per constant
    read = {i for n in graph.node for i in _reads(n)} | {o.name for o in graph.output}
    kept = [i for i in keep if i.name in read]
    for init in kept:  # what stays is read into memory before its file is replaced
        if uses_external_data(init):
            load_external_data_for_tensor(init, str(workdir))
            init.data_location = TensorProto.DEFAULT
            del init.external_data[:]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _toposort(graph)  # the lowered nodes were appended
    if any(n.domain == "com.microsoft" for n in graph.node):
        if not any(op.domain == "com.microsoft" for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, QUANT_OPSET)
    (workdir / _data(file)).unlink()  # saving appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=_data(file),
              size_threshold=1024)


def _stored_array(init, workdir: Path) -> np.ndarray:
    """An fp32 initializer's values, mapped from its external data file when it has one."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(init):
        return numpy_helper.to_array(init)
    where = {e.key: e.value for e in init.external_data}
    return np.memmap(workdir / where["location"], dtype=np.float32, mode="r", offset=int(where.get("offset", 0)),
                     shape=tuple(init.dims))


def _dequantize_linear(graph, weight: str, layout: str, q: np.ndarray, s: np.ndarray, scheme) -> list:
    """The weight as DequantizeLinear(codes, scales) feeding whatever read the float initializer."""
    from onnx import helper

    block = q.shape[1] // s.shape[1]
    if layout == "io":
        q, s, axis = q.T, s.T, 0
    else:
        axis = 1
    per_channel = scheme.granularity == "channel"
    if per_channel:  # one scale per output channel: a 1-D scale along the output axis
        s, axis = s.reshape(-1), 1 - axis
    qt = _codes_tensor(f"{weight}.codes", np.ascontiguousarray(q), scheme.bits)
    scale_inits, scale_name = _scales(graph, f"{weight}.scales", np.ascontiguousarray(s))
    attrs = {"axis": axis} if per_channel else {"axis": axis, "block_size": block}
    graph.node.insert(0, helper.make_node("DequantizeLinear", [qt.name, scale_name], [weight],
                                          name=f"dq_{weight}", **attrs))
    return [qt, *scale_inits]


def _scales(graph, name: str, scales: np.ndarray) -> tuple[list, str]:
    """Scales stored as fp16 when that is exact (our scales are bf16 values >= 2^-14, so always),
    with a Cast to fp32 that onnxruntime folds at load: the file carries 2 bytes per scale, the
    kernels see the same fp32 numbers (and still fuse DequantizeLinear + MatMul into MatMulNBits)."""
    from onnx import TensorProto, helper, numpy_helper

    half = scales.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), scales):
        return [numpy_helper.from_array(scales, name)], name
    graph.node.insert(0, helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"cast_{name}", to=TensorProto.FLOAT))
    return [numpy_helper.from_array(half, f"{name}.fp16")], name


def _nbits_layout(q: np.ndarray, s: np.ndarray, scheme) -> tuple[np.ndarray, np.ndarray, int]:
    """Codes [N, K] and scales as MatMulNBits wants them: unsigned codes (zero point 2^(bits-1))
    in blocks [N, K/block, block*bits/8], scales [N * K/block]. A per-row scale becomes the same
    scale repeated over the row's blocks (the same numbers)."""
    n, k = q.shape
    if scheme.granularity == "block":
        block = scheme.block_size
    else:
        block = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
        if block is None:
            raise ExportError(f"onnx: input width {k} is not a multiple of 16")
        s = np.repeat(s.reshape(n, 1), k // block, axis=1)
    if scheme.bits == 4:
        u = pack_int4(q.reshape(n, k // block, block), offset=True)
    else:
        u = (q.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // block, block)
    return np.ascontiguousarray(u), np.ascontiguousarray(s.reshape(-1)), block


def _runtime_quantizes(scheme) -> bool:
    return scheme.activations == "int8-dynamic"


def _accuracy_level(scheme) -> int:
    """An int8-dynamic scheme asks for int8 compute, which is MatMulNBits' accuracy level 4: it
    quantizes activations itself (per block of K) and runs MLAS's int8 kernels, for 4-bit codes as
    for 8-bit. Our own float activation-quantization ops in front of a level-1 (fp32) MatMulNBits
    would give the same rounding class at a fraction of the speed, so those layers get level 4 and
    no activation ops; every other layer computes in fp32 (level 1) on exactly our activations."""
    return 4 if _runtime_quantizes(scheme) else 1


def _matmul_users(graph, name: str) -> list:
    users = [n for n in graph.node if name in n.input]
    ok = users and all(n.op_type == "MatMul" and n.input[1] == name and n.input[0] != name for n in users)
    return users if ok else []


def _nbits_weights(graph, weight: str, q: np.ndarray, s: np.ndarray, scheme, gathered: bool = False,
                   zero: np.ndarray | None = None):
    """The initializers of one weight in MatMulNBits layout, and a maker of MatMulNBits nodes on them.
    `gathered`: scales fp32 [N, K/block], read as they are by MatMulNBits and by a row gather (a
    Cast or Reshape that onnxruntime folds at load would be one more copy in memory). `zero`: our
    float zero points per block (codes - zero), given to MatMulNBits for its unsigned codes."""
    from onnx import helper, numpy_helper

    n, k = q.shape
    packed, scales, block = _nbits_layout(q, s, scheme)
    b_name, s_name = f"{weight}.nbits", f"{weight}.nbits_scales"
    if gathered:
        scale_inits = [numpy_helper.from_array(scales.reshape(n, k // block).astype(np.float32), s_name)]
    else:
        scale_inits, _ = _scales(graph, s_name, scales)
    inputs = [b_name, s_name]
    if zero is not None:  # unsigned codes are ours + 2^(bits-1): so is their zero point
        z_name = f"{weight}.nbits_zeros"
        scale_inits.append(numpy_helper.from_array((zero.reshape(-1) + 2 ** (scheme.bits - 1)).astype(np.float32),
                                                   z_name))
        inputs.append(z_name)

    def matmul(m):  # MatMul(x, W^T) -> MatMulNBits(x, codes, scales[, zero points]), same outputs
        return helper.make_node("MatMulNBits", [m.input[0], *inputs], list(m.output), name=f"{m.name}_nbits",
                                domain="com.microsoft", K=k, N=n, bits=scheme.bits, block_size=block,
                                accuracy_level=_accuracy_level(scheme))

    return [numpy_helper.from_array(packed, b_name), *scale_inits], (b_name, s_name, block), matmul


def _lower_matmuls(graph, users: list, weight: str, q: np.ndarray, s: np.ndarray, scheme, zero=None) -> list:
    """MatMul(x, W^T) -> MatMulNBits(x, codes, scales): onnxruntime only fuses blocked INT4
    DequantizeLinear + MatMul itself; a per-channel INT8 DequantizeLinear would dequantize the
    whole weight every step, MatMulNBits reads the codes."""
    inits, _, matmul = _nbits_weights(graph, weight, q, s, scheme, zero=zero)
    for m in users:
        graph.node.remove(m)
        graph.node.append(matmul(m))  # topological order restored by the caller
    return inits


def _lower_matmul_groups(graph, matmuls: list) -> list:
    """Lower each (weight, users, codes, scales, scheme, zero points) to MatMulNBits, fusing the weights that one
    input feeds (q/k/v, gate/up) into one MatMulNBits and a Split: the kernel quantizes its input
    per call at accuracy level 4, and one wide call streams the input once."""
    from onnx import helper, numpy_helper

    groups: dict = {}
    for item in matmuls:
        weight, users, q, _, scheme, _ = item
        key = (users[0].input[0], q.shape[1], scheme) if len(users) == 1 else (weight,)
        groups.setdefault(key, []).append(item)
    inits = []
    for items in groups.values():
        if len(items) == 1:
            weight, users, q, s, scheme, z = items[0]
            inits += _lower_matmuls(graph, users, weight, q, s, scheme, z)
            continue
        fused = f"{items[0][0]}.fused{len(items)}"
        q = np.concatenate([it[2] for it in items])
        s = np.concatenate([it[3] for it in items])
        z = None if items[0][5] is None else np.concatenate([it[5] for it in items])
        w_inits, _, matmul = _nbits_weights(graph, fused, q, s, items[0][4], zero=z)
        mms = [it[1][0] for it in items]
        for m in mms:
            graph.node.remove(m)
        out = f"{fused}.out"
        graph.node.append(matmul(helper.make_node("MatMul", [mms[0].input[0], fused], [out], name=f"{mms[0].name}_fused")))
        sizes = numpy_helper.from_array(np.array([it[2].shape[0] for it in items], np.int64), f"{fused}.split")
        graph.node.append(helper.make_node("Split", [out, sizes.name], [m.output[0] for m in mms], name=f"{fused}_split",
                                           axis=-1))
        inits += [*w_inits, sizes]
    return inits


def _lower_table(graph, table: str, q: np.ndarray, s: np.ndarray, scheme) -> list:
    """The tied table as MatMulNBits weights: the head runs MatMulNBits on them and the embedding
    gathers and decodes rows (no whole-table dequantize per step), with the head's scales.

    onnxruntime keeps an initializer that a second node reads beside the copy MatMulNBits packs
    at load. At 8 bits the gather therefore reads its own copy of the codes (a file larger by the
    table, whose rows stay on disk until a token needs them); at 4 bits it reads the head's
    bytes, the table stored once."""
    from onnx import TensorProto, helper, numpy_helper

    vocab, width = q.shape
    inits, (b_name, s_name, block), matmul = _nbits_weights(graph, table, q, s, scheme, gathered=True)
    nblk, bits = width // block, scheme.bits
    rows_name = b_name
    if bits == 8:
        rows_name = f"{b_name}.rows"
        codes = next(i for i in inits if i.name == b_name)
        inits.append(numpy_helper.from_array(numpy_helper.to_array(codes), rows_name))
    consts = {f"{table}.c_{k}": v for k, v in {
        "flat": np.array([-1], np.int64),
        "blk": np.array([-1, nblk, block], np.int64), "width": np.array([width], np.int64),
        "zero": np.array(2 ** (bits - 1), np.float32), "mask": np.array(15, np.uint8),
        "four": np.array(4, np.uint8), "last": np.array([-1], np.int64)}.items()}
    inits += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    c = {k.rsplit("_", 1)[-1]: k for k in consts}
    users = [n for n in graph.node if table in n.input]
    new_nodes, drop = [], []
    for node in users:
        p = f"{node.name or node.output[0]}_nb"
        if node.op_type == "Gather" and node.input[0] == table and all(a.i == 0 for a in node.attribute if a.name == "axis"):
            ids, out = node.input[1], node.output[0]
            mk = lambda op, ins, outs, **kw: new_nodes.append(helper.make_node(op, ins, outs, **kw))  # noqa: E731
            mk("Reshape", [ids, c["flat"]], [f"{p}_ids"])
            mk("Gather", [rows_name, f"{p}_ids"], [f"{p}_bytes"], axis=0)  # [n, nblk, block*bits/8]
            if bits == 4:
                mk("BitwiseAnd", [f"{p}_bytes", c["mask"]], [f"{p}_lo"])
                mk("BitShift", [f"{p}_bytes", c["four"]], [f"{p}_hi"], direction="RIGHT")
                mk("Unsqueeze", [f"{p}_lo", c["last"]], [f"{p}_lo1"])
                mk("Unsqueeze", [f"{p}_hi", c["last"]], [f"{p}_hi1"])
                mk("Concat", [f"{p}_lo1", f"{p}_hi1"], [f"{p}_pairs"], axis=-1)
                mk("Reshape", [f"{p}_pairs", c["blk"]], [f"{p}_codes"])
            else:
                mk("Identity", [f"{p}_bytes"], [f"{p}_codes"])
            mk("Cast", [f"{p}_codes"], [f"{p}_f"], to=TensorProto.FLOAT)
            mk("Sub", [f"{p}_f", c["zero"]], [f"{p}_centered"])
            mk("Gather", [s_name, f"{p}_ids"], [f"{p}_s"], axis=0)
            mk("Unsqueeze", [f"{p}_s", c["last"]], [f"{p}_s1"])
            mk("Mul", [f"{p}_centered", f"{p}_s1"], [f"{p}_rows"])  # [n, nblk, block]
            mk("Shape", [ids], [f"{p}_ids_shape"])
            mk("Concat", [f"{p}_ids_shape", c["width"]], [f"{p}_out_shape"], axis=0)
            mk("Reshape", [f"{p}_rows", f"{p}_out_shape"], [out])
            drop.append(node)
        elif node.op_type == "Transpose" and [a.ints for a in node.attribute if a.name == "perm"] in ([], [[1, 0]]):
            matmuls = [n for n in graph.node if node.output[0] in n.input]
            if not matmuls or any(m.op_type != "MatMul" or m.input[1] != node.output[0] for m in matmuls):
                raise ExportError("onnx: the tied head is not a MatMul on the transposed table")
            new_nodes += [matmul(m) for m in matmuls]
            drop += matmuls
            drop.append(node)
        else:
            raise ExportError(f"onnx: cannot lower the quantized table used by a {node.op_type} node")
    for node in drop:
        graph.node.remove(node)
    graph.node.extend(new_nodes)  # put in topological order by the caller, once initializers are final
    return inits


def _reads(node) -> list[str]:
    """A node's inputs and the outer names its subgraphs (an If's branches) read."""
    names = list(node.input)
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            made = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
            names += [i for n in g.node for i in _reads(n) if i not in made]
    return names


def _toposort(graph) -> None:
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    ordered, pending = [], list(graph.node)
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in _reads(n)):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError(f"onnx: graph has a cycle or a missing input near node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _codes_tensor(name: str, q: np.ndarray, bits: int):
    """INT8 codes as bytes; INT4 codes packed two per byte, first element in the low nibble."""
    from onnx import TensorProto, helper, numpy_helper

    if bits == 8:
        return numpy_helper.from_array(q.astype(np.int8), name)
    return helper.make_tensor(name, TensorProto.INT4, list(q.shape), pack_int4(q).tobytes(), raw=True)


def _io(graph) -> dict:
    from onnx import helper

    def d(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            shape = [dim.dim_param or dim.dim_value for dim in tt.shape.dim]
            out.append({"name": v.name, "shape": shape, "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name})
        return out

    return {"inputs": d(graph.input), "outputs": d(graph.output)}


class OnnxSession(BaseSession):
    """The graph driven as onnxruntime-genai drives it: tokens at their own length, an all-ones
    mask as long as the sequence so far, and each present bound to its past's buffer. An artifact
    with image entry points runs text through its embedding graph first, as genai does. A prefill
    that wants every position's logits runs the score graph on the same buffers; an artifact
    without one (--no-debug-outputs) runs the chunk's tokens one at a time, as decode steps."""

    pads_prefill = False  # the graph's chunk length is dynamic

    def __init__(self, folder: Path, manifest: Manifest, threads: int):
        ort = require("onnxruntime", "onnx")
        self._ort, self._folder, self._threads = ort, folder, threads
        self._sess = self._load(manifest.program["file"], quantized=True)
        self.info = session_info(manifest)
        self._bos = manifest.tokenizer.bos
        self._names = genai_names(manifest.num_layers)
        self._shapes = {i.name: i.shape for i in self._sess.get_inputs()}
        self._with_hidden = {}  # graph -> whether it has the debug output (every output gets bound)
        if "logits" in manifest.program:  # the decoder gives the last position's logits
            self._score_file, self._score = manifest.program.get("score_graph"), None
        else:  # an artifact from before: one graph with every position's logits and any debug output
            self._score_file, self._score = manifest.program["file"], self._sess
        self._embeds = "inputs_embeds" in self._shapes
        images = manifest.images or {}
        self._graphs = {role: manifest.entry_points[name]["graph"] for role, name in
                        images.get("entry_points", {}).items() if name in manifest.entry_points}
        self._embedding = self._load(self._graphs["token_embedding"]) if self._embeds else None
        if self._embedding is not None:  # a text step places no image features ([0, hidden], as genai feeds it)
            self._no_images = np.zeros((0, manifest.hidden_size), np.float32)
            self._image_token = images["vision"]["image_token_id"]
        self._vision = None  # loaded on the first image
        self.reset()

    def _load(self, file: str, quantized: bool = False):
        path = self._folder / file
        try:
            return self._ort.InferenceSession(str(path), self._options(quantized), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ArtifactError(f"{path}: onnxruntime could not load the graph ({str(e).splitlines()[0]})") from None

    def _options(self, quantized: bool):
        """The session options of every graph (a profiler adds its own to these)."""
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        if quantized:
            # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits and, by default
            # (accuracy level 4), quantizes the activations again inside it. The graph already carries
            # the recipe's activation quantization, so the fused kernel must compute in fp32 (level 1):
            # then it matches PyTorch exactly.
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        return opts

    def reset(self) -> None:
        self._cache = {
            n: self._ort.OrtValue.ortvalue_from_numpy(np.zeros(self._shapes[n], dtype=np.float32)) for n in self._names
        }

    def _scoring(self):
        """The graph with every position's logits (and the hidden states), loaded on first use."""
        if self._score is None and self._score_file:
            self._score = self._load(self._score_file, quantized=True)
        return self._score

    def _step(self, tokens: np.ndarray, pos: int, hidden: bool = False, embeddings: np.ndarray | None = None,
              sess=None):
        """One chunk through `sess` (the decoder by default): its logits and, with `hidden`, its
        hidden states. An artifact with image entry points takes embeddings and the token ids: by
        default the text's own, through the embedding graph as genai runs it."""
        sess = sess or self._sess
        b = sess.io_binding()
        tokens = tokens.astype(np.int64)
        if self._embeds:
            if embeddings is None:
                (embeddings,) = self._embedding.run(None, {"input_ids": tokens, "image_features": self._no_images})
            b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeddings, np.float32))
        b.bind_cpu_input("input_ids", tokens)
        b.bind_cpu_input("attention_mask", np.ones((1, pos + tokens.shape[1]), dtype=np.int64))
        b.bind_output("logits", "cpu")  # outputs come back in binding order
        if sess not in self._with_hidden:
            self._with_hidden[sess] = HIDDEN in {o.name for o in sess.get_outputs()}
        if self._with_hidden[sess]:  # every output is bound; only `_hidden` reads this one
            b.bind_output(HIDDEN, "cpu")
        for name in self._names:
            b.bind_ortvalue_input(name, self._cache[name])
            b.bind_ortvalue_output(present_name(name), self._cache[name])
        sess.run_with_iobinding(b)
        outs = b.get_outputs()
        return outs[0].numpy()[0], (outs[1].numpy() if hidden else None)

    def _run(self, tokens, pos, n, decode):
        if decode:
            return self._step(tokens, pos)[0]
        if self._scoring() is None:
            return np.stack([self._step(tokens[:, i:i + 1], pos + i)[0][-1] for i in range(n)])
        return self._step(tokens, pos, sess=self._scoring())[0]

    def _run_last(self, tokens, pos, n):
        return self._step(tokens[:, :n], pos)[0][-1]

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if "vision_encoder" not in self._graphs:
            raise UnsupportedError("this artifact has no image entry points")
        if self._vision is None:
            self._vision = self._load(self._graphs["vision_encoder"])
        return self._vision.run(None, {"pixel_values": np.ascontiguousarray(pixels, np.float32)})[0][0]

    def _run_embeddings(self, embeddings: np.ndarray, pos: int, image: bool) -> np.ndarray:
        """The decoder sees a view by its token ids: image tokens attend both ways; a causal view
        (image=False) goes in under another id (<bos>'s), as text."""
        if not self._embeds:
            raise UnsupportedError("this artifact has no image entry points")
        ids = np.full((1, len(embeddings)), self._image_token if image else self._bos, np.int64)
        return self._step(ids, pos, hidden=False, embeddings=embeddings[None])[0]

    def _hidden(self, tokens, n):
        score = self._scoring()
        if score is None or HIDDEN not in {o.name for o in score.get_outputs()}:
            raise UnsupportedError("this artifact was exported with --no-debug-outputs; re-export it to locate")
        self.reset()
        hidden = self._step(tokens, 0, hidden=True, sess=score)[1]
        self.reset()
        return hidden
