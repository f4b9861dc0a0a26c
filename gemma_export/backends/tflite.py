"""TFLite / LiteRT as a LiteRT-LM bundle (`model.litertlm`): the TFLite model with the
signatures LiteRT-LM drives, its tokenizer and its LLM metadata (start and stop tokens, the chat
template, the context), written with litert-lm-builder.

Signatures, as LiteRT-LM's CPU executor calls them:
  prefill_<T>  tokens int32 [1, T], input_pos int32 [T] (padding slots hold token 0, position 0),
               kv_cache_k_<i> / kv_cache_v_<i> in and out under the same names (LiteRT-LM binds
               one buffer to both); no logits (it decodes the prompt's last token instead)
  decode       the same at T = 1, plus logits [1, 1, V]
  score_<T>    debug: prefill with logits for every position (fast teacher-forced verification;
               LiteRT-LM only runs signatures named prefill*/decode)
  hidden_<T>   debug: the residual stream per layer (verify --locate)
Without the debug signatures (--no-debug-outputs) the model holds LiteRT-LM's two signatures only
(each extra signature repeats every weight's per-channel quantization parameters in the file), and
our session scores a prefill chunk one decode step per token.
The cache lives in the graph, driven by input_pos: the first position and the number of valid
tokens (position 0 or positions after the first) give the step. Each cache is a ring (position p
in slot p mod S; local layers keep the window, global ones the context, so a global slot is its
position): decode writes its key and value in place with one DYNAMIC_UPDATE_SLICE (LiteRT-LM binds
the same buffer as input and output, and the kernel then copies nothing) and attends over the
buffer; a prefill chunk attends over [cache, chunk] and rewrites the cache once. Values are stored
transposed, [1, kv, head_dim, S], so both attention products read the caches as they lie.
Weights are shared by every signature. Quantized recipes convert the float
twin and then get the PyTorch codes written into the file (`tflite_codes`). Our session runs the
TFLite section of the bundle with LiteRT's CompiledModel, one cache buffer bound as input and
output, as LiteRT-LM does.
"""

from __future__ import annotations

import datetime
import gc
import io
import os
import tempfile
import uuid
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from .. import quiet
from ..artifact import Manifest, sha256_file, versions
from ..errors import ArtifactError, UnsupportedError
from ..gemma3 import family
from ..gemma3.config import Gemma3Config
from ..gemma3.model import NEG_INF
from ..session import BaseSession
from ..trace import DECODE, HIDDEN, describe_io, float_twin
from . import tflite_codes
from .base import Exported, Lowering, Runner, Stock, require, session_info

FILE = "model.litertlm"
TFLITE = "model.tflite"  # staged, then packed into the bundle


def prefill_name(t: int) -> str:
    return f"prefill_{t}"


def score_name(t: int) -> str:
    return f"score_{t}"


def hidden_name(t: int) -> str:
    return f"hidden_{t}"  # debug signature: residual stream per layer (verify --locate)


IMAGE_VIEW = "image_view_"


def image_name(t: int) -> str:
    # one image view's embeddings into the cache; not prefill*: LiteRT-LM takes those as its own
    return f"{IMAGE_VIEW}{t}"


VISION_ENCODER, VISION_ADAPTER = "vision_encoder", "vision_adapter"  # bundle sections beside the decoder
SECTIONS = {VISION_ENCODER: "tf_lite_vision_encoder", VISION_ADAPTER: "tf_lite_vision_adapter"}


def cache_names(cfg) -> list[str]:
    """LiteRT-LM finds the caches by the prefixes kv_cache_k_ / kv_cache_v_ (flat order [k0, v0,
    k1, v1, ...]); the executor metadata says which are local."""
    return [f"kv_cache_{kv}_{i}" for i in range(cfg.num_layers) for kv in ("k", "v")]


class _Step(nn.Module):
    """One LiteRT-LM step over keyword caches (signature converters name inputs by keyword)."""

    def __init__(self, model, logits: bool, hidden: bool = False):
        super().__init__()
        self.model, self.logits, self.hidden = model, logits, hidden
        self.names = cache_names(model.cfg)

    def forward(self, tokens, input_pos, **caches):
        pos = input_pos[:1]
        if tokens.shape[1] == 1:
            length = torch.ones(1, dtype=torch.int32)
        else:  # padding slots are at position 0; valid ones are the first, and any after it > 0
            length = 1 + (input_pos[1:] > 0).to(torch.int32).sum().reshape(1)
        out = self.model.step(tokens, pos, length, [caches[n] for n in self.names], hidden=self.hidden,
                              head=self.logits, attention=RingAttention(self.model.cfg, pos, length, tokens.shape[1]))
        if self.hidden:
            return {HIDDEN: out[2]}
        result = dict(zip(self.names, out[1]))
        if self.logits:
            result["logits"] = out[0]
        return result


class _ImageView(nn.Module):
    """One image view's soft-token embeddings [1, T, hidden] at input_pos [T] into the caches: the
    view's tokens attend to each other (and causally to the cache); the logits of the last one
    only, [1, 1, V] (what a prompt continues from: the head over every soft token would cost more
    than the view's layers on a small model)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.names = cache_names(model.cfg)

    def forward(self, embeddings, input_pos, **caches):
        t = embeddings.shape[1]
        pos, length = input_pos[:1], torch.full((1,), t, dtype=torch.int32)
        logits, new = self.model.decode(embeddings, pos, length, [caches[n] for n in self.names], all_logits=False,
                                        attention=RingAttention(self.model.cfg, pos, length, t, image=True))
        return {**dict(zip(self.names, new)), "logits": logits}


class _VisionEncoder(nn.Module):
    """SigLIP: pixels [1, 3, S, S] -> patch features [1, patches, width] (LiteRT-LM's vision encoder)."""

    def __init__(self, vision):
        super().__init__()
        self.vision = vision

    def forward(self, pixels):
        return {"features": self.vision.features(pixels)}


class _VisionAdapter(nn.Module):
    """Pooling, norm and projection: patch features -> soft-token embeddings [1, tokens, hidden]."""

    def __init__(self, vision):
        super().__init__()
        self.projector = vision.projector

    def forward(self, features):
        return {"embeddings": self.projector(features)}


class RingAttention:
    """The attention kernel of the TFLite graph (`Gemma3.decode`'s `attention` hook) for a step of
    t tokens at position pos, `length` of them valid. Keys are kept [1, kv, S, d], values
    transposed [1, kv, d, S]; slot s holds the latest position written that is s modulo S.

    Decode (t = 1) writes the new key and value at slot pos mod S with dynamic_update_slice and
    attends over the buffer: nothing else of the cache is read twice or moved. A prefill chunk
    attends over [cache, chunk] (its own earlier tokens need the entries it is about to
    overwrite) and then gathers the new cache from that concatenation, taking each slot's latest
    valid chunk position, so padding never enters it."""

    def __init__(self, cfg, pos: torch.Tensor, length: torch.Tensor, t: int, image: bool = False):
        # image: the chunk is one image view, every token of it seeing the others
        self.cfg, self.pos, self.length, self.t, self.image = cfg, pos, length, t, image

    def __call__(self, q, k, v, k_cache, v_cache, is_global, scale):
        cfg, t, pos = self.cfg, self.t, self.pos
        kv, d = cfg.num_kv_heads, cfg.head_dim
        rep, size = cfg.num_heads // kv, k_cache.shape[2]
        window = None if is_global else cfg.sliding_window
        slots = torch.arange(size, dtype=pos.dtype)
        if t == 1:  # no transposes: one position's heads are contiguous
            qg, k, v = q.reshape(1, kv, rep, d), k.reshape(1, kv, 1, d), v.reshape(1, kv, d, 1)
            slot = torch.remainder(pos, size).reshape([])
            zero = torch.zeros([], dtype=slot.dtype)
            keys = _dynamic_update_slice(k_cache, k, [zero, zero, slot, zero])
            values = _dynamic_update_slice(v_cache, v, [zero, zero, zero, slot])
            # slot s now holds position pos - ((pos - s) mod S); negative: never written
            k_pos = pos - torch.remainder(pos - slots, size)
            mask = _allowed(pos, k_pos, window)
        else:
            qg = q.view(1, t, cfg.num_heads, d).transpose(1, 2).reshape(1, kv, rep * t, d)
            k = k.view(1, t, kv, d).transpose(1, 2)
            v = v.view(1, t, kv, d).permute(0, 2, 3, 1)
            keys, values = torch.cat((k_cache, k), dim=2), torch.cat((v_cache, v), dim=3)
            q_pos = pos + torch.arange(t, dtype=pos.dtype)
            last = pos - 1  # the latest position in the cache before this chunk
            old = last - torch.remainder(last - slots, size)
            mask = _allowed(q_pos, torch.cat((old, q_pos)), window)
            if self.image:
                mask = mask | torch.cat((torch.zeros(t, size, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool)), 1)
            # slot s takes chunk token j = (n - 1) - ((pos + n - 1 - s) mod S) when j >= 0
            n = self.length
            j = (n - 1) - torch.remainder(pos + n - 1 - slots, size)
            take = torch.where(j >= 0, size + j, slots)
        bias = torch.where(mask, 0.0, NEG_INF).to(q.dtype).repeat(rep, 1)  # rows as qg's: [rep * t, keys]
        scores = torch.matmul(qg * scale, keys.transpose(2, 3)) + bias
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        out = torch.matmul(probs, values.transpose(2, 3))  # [1, kv, rep*t, d]
        out = out.reshape(1, cfg.num_heads, t, d).transpose(1, 2).reshape(1, t, cfg.q_dim)
        if t > 1:
            keys, values = torch.index_select(keys, 2, take), torch.index_select(values, 3, take)
        return out, keys, values


def _allowed(q_pos, k_pos, window):
    """[queries, keys] bool: the key was written (position >= 0), is not after the query and, on a
    local layer, lies inside its window."""
    diff = q_pos.reshape(-1, 1) - k_pos.reshape(1, -1)
    ok = (k_pos.reshape(1, -1) >= 0) & (diff >= 0)
    return ok & (diff < window) if window is not None else ok


def _dynamic_update_slice(cache, update, start):
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

    return dynamic_update_slice(cache, update, start)


def cache_shapes(model) -> list[tuple[int, ...]]:
    """The flat cache shapes of the TFLite graph: keys [1, kv, S, d], values [1, kv, d, S]."""
    return [s if i % 2 == 0 else s[:2] + (s[3], s[2]) for i, s in enumerate(model.cache_shapes())]


def _inputs(model, t: int) -> dict[str, torch.Tensor]:
    inputs = {"tokens": torch.zeros(1, t, dtype=torch.int32), "input_pos": torch.arange(t, dtype=torch.int32)}
    for name, shape in zip(cache_names(model.cfg), cache_shapes(model)):
        inputs[name] = torch.zeros(shape, dtype=model.dtype)
    return inputs


def _image_inputs(model, vc) -> dict[str, torch.Tensor]:
    t = vc.tokens_per_image
    inputs = {"embeddings": torch.zeros(1, t, model.cfg.hidden_size), "input_pos": torch.arange(t, dtype=torch.int32)}
    return {**inputs, **{k: v for k, v in _inputs(model, t).items() if k not in ("tokens", "input_pos")}}


def _vision_samples(vision) -> dict:
    vc = vision.cfg
    pixels = torch.zeros(1, 3, vc.image_size, vc.image_size)
    features = torch.zeros(1, vc.patches_per_side ** 2, vc.hidden_size)
    return {VISION_ENCODER: ({"pixels": pixels}, {"features": features}),
            VISION_ADAPTER: ({"features": features}, {"embeddings": torch.zeros(1, vc.tokens_per_image,
                                                                              vc.text_hidden_size)})}


def _vision_io(vision) -> dict:
    return {name: describe_io(ins, outs) for name, (ins, outs) in _vision_samples(vision).items()}


def _convert_vision(vision, workdir: Path, litert_torch, progress) -> dict[str, Path]:
    """The vision encoder and adapter as their own float TFLite models (bundle sections)."""
    samples = _vision_samples(vision)
    out = {}
    for name, module in ((VISION_ENCODER, _VisionEncoder(vision)), (VISION_ADAPTER, _VisionAdapter(vision))):
        progress(f"litert-torch conversion ({name})")
        with torch.no_grad(), mock.patch.dict(os.environ, {"LITERT_TORCH_SHOW_PROGRESS": "n"}):
            edge = litert_torch.signature("serving_default", module.eval(), sample_kwargs=samples[name][0]).convert(
                runtime_constant_folding=False)
            out[name] = workdir / f"{name}.tflite"
            edge.export(str(out[name]))
        del edge
        gc.collect()
    return out


def _outputs(model, t: int, logits: bool) -> dict[str, torch.Tensor]:
    outs = {n: torch.zeros(s) for n, s in zip(cache_names(model.cfg), cache_shapes(model))}
    if logits:
        outs["logits"] = torch.zeros(1, t, model.cfg.vocab_size)
    return outs


class TfliteBackend:
    name = "tflite"
    images = True  # vision encoder and adapter sections, and an image-view signature in the decoder
    # dynamic-range kernels (XNNPACK): int8 per channel or int4 blocks, activations quantized by
    # the kernel; every weight quantized
    lowering = Lowering(frozenset({(8, "channel"), (4, "block")}), frozenset({"int8-dynamic"}), complete=True)
    runner = Runner("GEMMA_TFLITE_RUNNER",
                    "LiteRT-LM's command-line tool (litert_lm_main, built from the LiteRT-LM\n"
                    "repository), run as $GEMMA_TFLITE_RUNNER --model_path model.litertlm\n"
                    "--backend cpu --input_prompt ...",
                    stock_args=("--model_path", "artifact/model.litertlm", "--backend", "cpu",
                                "--input_prompt", "{prompt}"),
                    bos_in_prompt=False)

    def export(self, model, job, workdir: Path, progress, vocab, vision=None) -> Exported:
        litert_torch = require("litert_torch", self.name)
        require("litert_lm_builder", self.name)
        codes = float_twin(model, activation_ops=False)  # the runtime's kernels quantize activations
        t = job.prefill_len
        # decode first: its subgraph holds every weight (prefill without logits drops the last
        # layer's MLP), and the codes are matched and written there
        sigs = {DECODE: (_Step(model, logits=True), _inputs(model, 1)),
                prefill_name(t): (_Step(model, logits=False), _inputs(model, t))}
        if job.debug_outputs:
            sigs[score_name(t)] = (_Step(model, logits=True), _inputs(model, t))
            sigs[hidden_name(t)] = (_Step(model, logits=False, hidden=True), _inputs(model, t))
        if vision is not None:
            sigs[image_name(vision.cfg.tokens_per_image)] = (_ImageView(model), _image_inputs(model, vision.cfg))
        progress(f"litert-torch conversion (signatures {', '.join(sigs)}; lightweight)")
        tflite = workdir / TFLITE
        # litert-torch prints its own task tree on stdout (our progress lines say the same on stderr)
        with torch.no_grad(), mock.patch.dict(os.environ, {"LITERT_TORCH_SHOW_PROGRESS": "n"}):
            conv = None
            for name, (module, inputs) in sigs.items():
                conv = (conv or litert_torch).signature(name, module.eval(), sample_kwargs=inputs)
            # lightweight conversion keeps memory down for 1B+; its default runtime constant folding
            # writes constants the interpreter rejects ("Tensor N is invalidly specified in
            # schema"), so it is turned off.
            edge = conv.convert(lightweight_conversion=True, runtime_constant_folding=False)
            progress("writing .tflite")
            edge.export(str(tflite))
        del edge
        gc.collect()
        quantized = []
        if codes:
            quantized = tflite_codes.quantize_file(tflite, codes, progress)
        sections, images = {}, None
        if vision is not None:
            sections = _convert_vision(vision, workdir, litert_torch, progress)
            n = vision.cfg.tokens_per_image
            images = (vision.cfg, {"vision_encoder": VISION_ENCODER, "vision_adapter": VISION_ADAPTER,
                                   "image_view": image_name(n)})
        progress("packing the LiteRT-LM bundle (model, tokenizer, LLM metadata)")
        _write_bundle(workdir, tflite, model.cfg, job, vocab, sections)
        tflite.unlink()
        for path in sections.values():
            path.unlink()
        entry = {prefill_name(t): describe_io(_inputs(model, t), _outputs(model, t, False)),
                 DECODE: describe_io(_inputs(model, 1), _outputs(model, 1, True))}
        if job.debug_outputs:
            entry[score_name(t)] = describe_io(_inputs(model, t), _outputs(model, t, True))
        if vision is not None:
            vc = vision.cfg
            entry[image_name(vc.tokens_per_image)] = describe_io(_image_inputs(model, vc),
                                                                  _outputs(model, 1, True))
            entry.update(_vision_io(vision))
        return Exported(
            images=images,
            entry_points=entry,
            program={"file": FILE, "signatures": list(sigs), "kv_cache": "one buffer per cache, in and out",
                     **({"sections": list(sections)} if sections else {}),
                     "quantized_weights": quantized},
            versions=versions("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "litert-lm-builder"))

    def open(self, folder: Path, manifest: Manifest, threads: int) -> "TfliteSession":
        return TfliteSession(folder, manifest, threads)

    def read_codes(self, folder: Path, manifest: Manifest) -> list[np.ndarray]:
        """The codes int8 [out, in] of every integer weight in the bundle's TFLite model."""
        return list(tflite_codes.read_codes(folder / manifest.program["file"], tflite_section(
            folder / manifest.program["file"])).values())

    def declared_io(self, folder: Path, manifest: Manifest) -> dict[str, dict]:
        """The signatures of the bundle's TFLite model, read from its flatbuffer (not loaded)."""
        path = folder / manifest.program["file"]
        with tflite_codes.TfliteFile(path, section=tflite_section(path)) as f:
            io = tflite_codes.signatures(f)
        if manifest.images:  # each vision section's one signature, under the section's name
            for name, kind in SECTIONS.items():
                with tflite_codes.TfliteFile(path, section=tflite_section(path, kind)) as f:
                    io.update({name: sig for sig in tflite_codes.signatures(f).values()})
        return io

    def stock_generate(self, folder: Path, manifest: Manifest, text: str, max_new_tokens: int) -> Stock:
        """Greedy text from LiteRT-LM's own engine on the bundle (it adds the start token itself)."""
        folder = Path(folder)
        lm = require("litert_lm", self.name)
        lm.set_min_log_severity(lm.LogSeverity.ERROR)
        # the engine caches XNNPACK's packed weights beside the model unless told otherwise; an
        # artifact folder stays as exported
        with tempfile.TemporaryDirectory() as cache, lm.Engine(
                str(folder / manifest.program["file"]), backend=lm.Backend.CPU(),
                max_num_tokens=manifest.max_context, cache_dir=cache) as engine:
            session = engine.create_session(apply_prompt_template=False, max_output_tokens=max_new_tokens,
                                            sampler_config=lm.SamplerConfig(top_k=1, temperature=0.0))
            session.run_prefill([text])
            responses = session.run_decode()
            session.close()
        return Stock(_response_text(responses))


def _response_text(responses) -> str:
    texts = getattr(responses, "texts", None)
    if texts is None:
        return str(responses)
    return texts[0] if texts else ""


def _write_bundle(workdir: Path, tflite: Path, cfg, job, vocab, sections: dict | None = None) -> None:
    from litert_lm_builder import litertlm_builder as lb
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    meta = llm_metadata_pb2.LlmMetadata()
    meta.start_token.token_ids.ids.append(vocab.bos_id)
    for stop in vocab.stop_ids:
        meta.stop_tokens.add().token_ids.ids.append(stop)
    meta.max_num_tokens = job.max_context
    meta.llm_model_type.gemma3.SetInParent()
    user_prefix, _, rest = family.chat_text("{prompt}").partition("{prompt}")
    user_suffix, model_prefix = rest.split(family.SPECIAL_TOKENS["start_of_turn"], 1)
    meta.prompt_templates.user.prefix = user_prefix
    meta.prompt_templates.user.suffix = user_suffix
    meta.prompt_templates.model.prefix = family.SPECIAL_TOKENS["start_of_turn"] + model_prefix
    meta.prompt_templates.model.suffix = family.SPECIAL_TOKENS["end_of_turn"] + "\n"
    meta.jinja_prompt_template = family.CHAT_JINJA
    meta.supports_thinking = False
    meta.supports_function_calling = False
    meta_path, exec_path = workdir / "llm_metadata.pb", workdir / "executor_metadata.pb"
    meta_path.write_bytes(meta.SerializeToString())
    exec_path.write_bytes(_executor_metadata(cfg, job).SerializeToString())
    builder = (lb.LitertLmFileBuilder()
               .add_system_metadata(lb.Metadata(key="Authors", value="gemma-export", dtype=lb.DType.STRING))
               .add_llm_metadata(str(meta_path))
               .add_executor_metadata(str(exec_path))
               .add_tflite_model(str(tflite), lb.TfLiteModelType.PREFILL_DECODE))
    for name, path in (sections or {}).items():
        builder = builder.add_tflite_model(str(path), getattr(lb.TfLiteModelType, name.upper()))
    builder = builder.add_hf_tokenizer(str(vocab.path))
    with (workdir / FILE).open("wb") as f, mock.patch.object(lb, "populate_system_metadata",
                                                             _reproducible_system_metadata(lb, tflite)):
        builder.build(f, validate_metadata=True)
    meta_path.unlink()
    exec_path.unlink()


def _reproducible_system_metadata(lb, tflite: Path):
    """The builder stamps every bundle with a random uuid and the current time, so no two builds
    had the same bytes. Ours: a uuid derived from the model's bytes (same model, same uuid) and the
    time from SOURCE_DATE_EPOCH (the reproducible-builds convention; the epoch when unset)."""
    ident = str(uuid.uuid5(uuid.NAMESPACE_URL, "gemma-export:" + sha256_file(tflite)))
    stamp = datetime.datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), datetime.timezone.utc)

    def populate(system_metadata):
        kept = [m for m in system_metadata if m.key not in ("uuid", "creation_timestamp")]
        return [*kept, lb.Metadata(key="uuid", value=ident, dtype=lb.DType.STRING),
                lb.Metadata(key="creation_timestamp", value=stamp.isoformat(), dtype=lb.DType.STRING)]
    return populate


def _executor_metadata(cfg, job):
    """Which caches are local (window-sized) and which global, and the window: without it
    LiteRT-LM takes the shortest cache as the longest sequence it may run."""
    from litert_lm_builder.runtime.proto import executor_metadata_pb2 as em

    meta = em.ExecutorMetadata()
    llm = meta.llm_executor_metadata
    llm.max_history_size = job.max_context
    mask = llm.attention_mask_settings
    mask.attention_mask_type = em.ATTENTION_MASK_TYPE_CAUSAL
    mask.local_attention_mask_type = em.ATTENTION_MASK_TYPE_CAUSAL
    mask.sliding_window_size = cfg.sliding_window
    names = cache_names(cfg)
    for i in range(cfg.num_layers):
        scope = "GLOBAL" if cfg.is_global(i) else "LOCAL"
        for kv, name in zip(("KEY", "VALUE"), names[2 * i:2 * i + 2]):
            buf = llm.state_buffers.add(prefill_input_name=name, prefill_output_name=name, decode_input_name=name,
                                        decode_output_name=name, sequence_axis=2 if kv == "KEY" else 3,
                                        maximum_sequence_length=cfg.cache_len(i, job.max_context))
            buf.type = getattr(em.StateBuffer, f"TYPE_{scope}_{kv}_CACHE")
    return meta


def tflite_section(bundle: Path, kind: str = "tf_lite_prefill_decode") -> tuple[int, int]:
    """(offset, size) of a TFLite model inside a .litertlm bundle (by default the decoder's)."""
    from litert_lm_builder import litertlm_peek

    try:
        header = litertlm_peek.read_litertlm_header(str(bundle), io.StringIO())
    except (ValueError, OSError, IndexError) as e:
        raise ArtifactError(f"{bundle}: not a LiteRT-LM bundle ({e})") from None
    sections = header.SectionMetadata()
    for i in range(sections.ObjectsLength() if sections else 0):
        obj = sections.Objects(i)
        if litertlm_peek.get_model_type(obj) == kind:
            return obj.BeginOffset(), obj.EndOffset() - obj.BeginOffset()
    raise ArtifactError(f"{bundle}: the LiteRT-LM bundle holds no {kind[len('tf_lite_'):]} TFLite model")


def read_section(bundle: Path, kind: str = "tf_lite_prefill_decode") -> bytes:
    """The bytes of a TFLite model inside a .litertlm bundle."""
    offset, size = tflite_section(bundle, kind)
    with bundle.open("rb") as f:
        f.seek(offset)
        return f.read(size)


BACKEND = TfliteBackend()


class TfliteSession(BaseSession):
    """The bundle's TFLite model driven as LiteRT-LM drives it: the decode signature with one
    buffer per cache bound as input and output; prefill chunks padded with token 0 at position 0
    (through score_<T>, which adds the logits verification needs; an artifact without it runs the
    chunk's valid tokens through decode, the same numbers one step at a time)."""

    def __init__(self, folder: Path, manifest: Manifest, threads: int):
        path = folder / manifest.program["file"]
        data = read_section(path)
        self._threads = threads
        with quiet.native_info_lines():  # LiteRT's environment announces its accelerators on first use
            self._open(path, data, manifest)

    def __del__(self):
        try:
            with quiet.native_info_lines():  # and lists each accelerator it destroys
                self.__dict__.clear()
        except Exception:  # at interpreter shutdown the modules it needs may be gone already
            pass

    def _open(self, path: Path, data: bytes, manifest: Manifest) -> None:
        compiled = require("ai_edge_litert.compiled_model", "tflite")
        try:
            self._cm = compiled.CompiledModel.from_buffer(data, options=self._options())
        except Exception as e:
            raise ArtifactError(f"{path}: LiteRT could not load the model ({str(e).splitlines()[0]})") from None
        self._data = data  # the runtime reads weights from this buffer
        self._path, self._sections = path, {}
        self._vision = (manifest.images or {}).get("vision")
        self.info = session_info(manifest)
        t = self.info.prefill_len
        self._score, self._signatures = score_name(t), manifest.program["signatures"]
        self._names = cache_names(Gemma3Config.from_dict(manifest.model.config))
        self._hidden_width = manifest.hidden_size
        self._shapes = {e["name"]: e["shape"] for e in manifest.entry_points[DECODE]["inputs"]}
        # an image view's logits: the last token's, or (artifacts from before) every token's
        self._image_logits = {sig: next(o["shape"] for o in io["outputs"] if o["name"] == "logits")
                              for sig, io in manifest.entry_points.items() if sig.startswith(IMAGE_VIEW)}
        cm = self._cm
        self._cache = {n: cm.create_input_buffer_by_name(DECODE, n) for n in self._names}
        scored = [sig for sig in (self._score, DECODE) if sig in self._signatures]
        self._io = {sig: ({k: cm.create_input_buffer_by_name(sig, k) for k in ("tokens", "input_pos")},
                          cm.create_output_buffer_by_name(sig, "logits")) for sig in scored}
        self._prefill = prefill_name(t)
        self._prefill_in = {k: cm.create_input_buffer_by_name(self._prefill, k) for k in ("tokens", "input_pos")}
        self.reset()

    def _options(self):
        """CPU with the thread count asked for (given no options, LiteRT's CPU runs one thread)."""
        opts = require("ai_edge_litert.options", "tflite")
        return opts.Options(cpu_options=opts.CpuOptions(num_threads=self._threads))

    def reset(self) -> None:
        for n in self._names:
            self._cache[n].write(np.zeros(self._shapes[n], dtype=np.float32))

    def _run(self, tokens, pos, n, decode):
        if not decode and self._score not in self._io:  # a release artifact: decode step by step
            logits = np.zeros((tokens.shape[1], self.info.vocab_size), np.float32)
            for i in range(n):
                logits[i] = self._run(tokens[:, i:i + 1], pos + i, 1, True)[0]
            return logits
        sig = DECODE if decode else self._score
        ins, logits = self._io[sig]
        _write_step(ins, tokens, pos, n)
        self._cm.run_by_name(sig, {**ins, **self._cache}, {"logits": logits, **self._cache})
        t, v = tokens.shape[1], self.info.vocab_size
        return logits.read(t * v, np.float32).reshape(t, v)

    def _run_last(self, tokens, pos, n):
        """As LiteRT-LM runs a prompt: prefill_<T> (caches only, no head) over all but the last
        token, then decode on the last for its logits."""
        if n > 1:
            chunk = tokens.copy()
            chunk[:, n - 1:] = 0  # padding: token 0 at position 0
            _write_step(self._prefill_in, chunk, pos, n - 1)
            self._cm.run_by_name(self._prefill, {**self._prefill_in, **self._cache}, dict(self._cache))
        return self._run(tokens[:, n - 1:n], pos + n - 1, 1, True)[0]

    def _section(self, name: str):
        """A vision section of the bundle as its own compiled model (loaded on first use)."""
        if name not in self._sections:
            data = read_section(self._path, SECTIONS[name])
            compiled = require("ai_edge_litert.compiled_model", "tflite")
            with quiet.native_info_lines():
                self._sections[name] = (compiled.CompiledModel.from_buffer(data, options=self._options()), data)
        return self._sections[name][0]

    def _call(self, cm, sig: str, inputs: dict, output: str, shape) -> np.ndarray:
        ins = {}
        for k, v in inputs.items():
            ins[k] = cm.create_input_buffer_by_name(sig, k)
            ins[k].write(np.ascontiguousarray(v))
        out = cm.create_output_buffer_by_name(sig, output)
        cm.run_by_name(sig, ins, {output: out})
        return out.read(int(np.prod(shape)), np.float32).reshape(shape)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        vc = self._vision
        features = self._call(self._section(VISION_ENCODER), "serving_default",
                              {"pixels": np.asarray(pixels, np.float32)}, "features",
                              (1, (vc["image_size"] // vc["patch_size"]) ** 2, vc["hidden_size"]))
        return self._call(self._section(VISION_ADAPTER), "serving_default", {"features": features}, "embeddings",
                          (vc["tokens_per_image"], vc["text_hidden_size"]))

    def _run_embeddings(self, embeddings, pos, image):
        t = len(embeddings)
        sig, cm = image_name(t), self._cm
        if not image:
            raise UnsupportedError("a TFLite artifact runs embeddings only as image views (no causal embeddings "
                                   "signature)")
        if sig not in self._signatures:
            raise UnsupportedError(f"this artifact takes image views of {self._vision['tokens_per_image']} "
                                   f"embeddings, not {t}")
        ins = {k: cm.create_input_buffer_by_name(sig, k) for k in ("embeddings", "input_pos")}
        ins["embeddings"].write(np.ascontiguousarray(embeddings[None], np.float32))
        ins["input_pos"].write(pos + np.arange(t, dtype=np.int32))
        logits = cm.create_output_buffer_by_name(sig, "logits")
        self._cm.run_by_name(sig, {**ins, **self._cache}, {"logits": logits, **self._cache})
        shape = self._image_logits[sig]
        return logits.read(int(np.prod(shape)), np.float32).reshape(-1, shape[-1])

    def _hidden(self, tokens, n):
        sig, cm = hidden_name(self.info.prefill_len), self._cm
        if sig not in self._signatures:
            raise UnsupportedError("this artifact was exported with --no-debug-outputs; re-export it to locate")
        ins = {k: cm.create_input_buffer_by_name(sig, k) for k in ("tokens", "input_pos")}
        _write_step(ins, tokens, 0, n)
        zeros = {k: cm.create_input_buffer_by_name(sig, k) for k in self._names}
        for k, buf in zeros.items():
            buf.write(np.zeros(self._shapes[k], dtype=np.float32))
        out = cm.create_output_buffer_by_name(sig, HIDDEN)
        cm.run_by_name(sig, {**ins, **zeros}, {HIDDEN: out})
        layers, t = len(self._names) // 2 + 1, tokens.shape[1]
        return out.read(layers * t * self._hidden_width, np.float32).reshape(layers, t, self._hidden_width)


def _write_step(ins: dict, tokens: np.ndarray, pos: int, n: int) -> None:
    """Tokens and positions as LiteRT-LM writes them: padding slots hold token 0 at position 0."""
    ins["tokens"].write(tokens)
    positions = np.zeros(tokens.shape[1], dtype=np.int32)
    positions[:n] = pos + np.arange(n, dtype=np.int32)
    ins["input_pos"].write(positions)
