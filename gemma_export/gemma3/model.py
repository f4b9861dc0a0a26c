"""The Gemma 3 text decoder, written for export.

Everything is static-shaped. One step processes a chunk of T tokens at position `pos`
(T = prefill length, or 1 for decode) against a KV cache whose length depends on the layer type:
`sliding_window` positions for local layers, `max_context` for global ones.

The cache is a *sliding* cache: slot s of a cache of length S always holds position
`pos - S + s` (slots before position 0 are empty and masked). A step attends over the
concatenation [cache, new keys] and keeps its last S entries (`length + arange(S)`), so only
`length` valid tokens of a padded chunk enter the cache. No scatter at a dynamic index, no
modulo: the same graph converts anywhere, and positions can run past the window forever. It is the
reference; the exported programs replace it through `decode`'s `attention` hook by their runtime's
in-place cache kernels.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import Gemma3Config

NEG_INF = -1e30  # additive mask value; finite so fully-masked padding rows stay NaN-free


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the stored weight w is applied as (1 + w), computed in fp32."""

    plain = False  # the textbook form instead (see plain_forms)
    fused = False  # one rms_norm op (see npu_forms)
    scaled = False  # each row divided by its largest |x| first (see npu_forms: fp16 squares overflow)
    gain = 1.0  # times the output (see npu_forms: the norms that write the residual stream)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.fused:
            return F.rms_norm(xf, (xf.shape[-1],), 1.0 + self.weight.float(), self.eps).to(x.dtype)
        if self.scaled:
            peak = xf.abs().amax(-1, keepdim=True)
            z = xf / peak
            y = z * torch.rsqrt((z * z).mean(-1, keepdim=True) + self.eps / (peak * peak))
            return (y * ((1.0 + self.weight.float()) * self.gain)).to(x.dtype)
        if self.plain:
            y = xf * torch.reciprocal(torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))  # onnxscript's form
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        # mean of squares over the last dim, written as a 4D mean over dims (2, 3) with keepdim:
        # the form XNNPACK delegates (a plain last-dim mean splits the ExecuTorch graph into
        # hundreds of partitions, and lowering time grows with their count).
        n = xf.shape[-1]
        # the shape back written with -1 for the (dynamic) token dim: XNNPACK refuses a reshape to
        # a symbolic shape, and each refusal ended a partition at every norm
        back = (-1, 1) if xf.dim() == 2 else (xf.shape[0], -1, *xf.shape[2:-1], 1)
        ms = (xf * xf).reshape(1, -1, n, 1).mean((2, 3), keepdim=True).reshape(back)
        y = xf * torch.rsqrt(ms + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    plain = False  # GELU written out (see plain_forms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        return self.down_proj(gelu_tanh(g, self.plain) * self.up_proj(x))


def gelu_tanh(x: torch.Tensor, plain: bool = False) -> torch.Tensor:
    """tanh-approximated GELU; `plain` writes the formula out (see plain_forms)."""
    if plain:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))
    return F.gelu(x, approximate="tanh")


@contextlib.contextmanager
def plain_forms(model: nn.Module):
    """RMSNorm and tanh-GELU in their textbook forms while tracing: the forms onnxscript's and
    onnxruntime's graph rewriters recognise and fuse (SimplifiedLayerNormalization, FastGelu). The
    default forms are the ones XNNPACK delegates whole (its own GELU is the less exact: 3e-5 of
    the largest value, against 4e-8 written out, measured on random activations)."""
    mods = [m for m in model.modules() if "plain" in vars(type(m))]  # RMSNorm, MLP, the vision MLP
    for m in mods:
        m.plain = True
    try:
        yield model
    finally:
        for m in mods:
            del m.plain


@contextlib.contextmanager
def npu_forms(model: nn.Module, mask_value: float, fp16: bool = False):
    """The forms NPU compilers take while tracing: masks of `mask_value` instead of -1e30, so that
    scores plus mask keep a range a static per-tensor scale can resolve; RoPE's cos and sin looked
    up by position in tables of the whole context (a computed angle, position x frequency, gets a
    static range from the calibrated positions only, and in fp16 it is off by up to 2 radians at
    position 4096); and, for quantized graphs, each RMSNorm as one rms_norm op (ONNX
    RMSNormalization, which the Hexagon compiler maps to its own; its textbook Sqrt and Reciprocal
    quantized to 16 bits came out wrong on the HTP emulator).

    `fp16` is for graphs the NPU computes in fp16, where the real 270M overflows: its residual
    stream reaches ~1e5 (fp16 stops at 65504), and the squares inside a norm overflow far sooner.
    So the residual stream is carried divided by RESIDUAL_SCALE (the embedding and the norms that
    add to the stream scaled down, the norms that read it given eps / scale^2: RMSNorm is scale
    invariant, so the outputs are the same in exact arithmetic), and each norm divides its row by
    the row's largest |x| before squaring."""
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    for m in norms:
        if fp16:
            m.scaled = True
        else:
            m.fused = True
    model.mask_value = mask_value
    model.rope_lookup = {g: model.rope_tables(g, model.max_context) for g in (False, True)}
    readers, writers = [], []
    if fp16:
        model.residual_scale = RESIDUAL_SCALE
        readers = [model.norm] + [m for layer in model.layers for m in (layer.input_layernorm, layer.pre_feedforward_layernorm)]
        writers = [m for layer in model.layers for m in (layer.post_attention_layernorm, layer.post_feedforward_layernorm)]
        for m in readers:
            m.eps = m.eps / RESIDUAL_SCALE**2
        for m in writers:
            m.gain = 1.0 / RESIDUAL_SCALE
    try:
        yield model
    finally:
        for m in norms:
            vars(m).pop("fused", None)
            vars(m).pop("scaled", None)
        for m in readers:
            m.eps = m.eps * RESIDUAL_SCALE**2
        for m in writers:
            del m.gain
        del model.mask_value, model.rope_lookup
        vars(model).pop("residual_scale", None)


# a power of two (exact in every float). The real 270M's stream peaks at ~1.04e5, so ~1.6e3 scaled;
# on the HTP emulator a tiny model's fp16 graph went wrong once its scaled stream passed ~1.6e4
RESIDUAL_SCALE = 64.0


def rope_inv_freq(head_dim: int, base: float, scaling: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return (1.0 / (base**exponents)) / scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def int8_codes_per_token(x: torch.Tensor):
    """(codes, scale, zero point) of asymmetric int8 per row of x's last dimension (per token and
    head): the ops ExecuTorch's quantized cache runs (torch's definitions of quantized_decomposed)."""
    from torch.ao.quantization.fx import _decomposed  # noqa: F401  registers quantized_decomposed

    ops = torch.ops.quantized_decomposed
    scale, zero = ops.choose_qparams_per_token_asymmetric(x, torch.int8)
    return ops.quantize_per_token(x, scale, zero, -128, 127, torch.int8), scale, zero


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x as an int8 KV cache holds it (int8_codes_per_token), read back as floats."""
    codes, scale, zero = int8_codes_per_token(x)
    return torch.ops.quantized_decomposed.dequantize_per_token(codes, scale, zero, -128, 127, torch.int8, x.dtype)


class Attention(nn.Module):
    kv_dtype = "fp32"  # fp16 / int8: queries, keys and values rounded as the runtime's cache kernel does

    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        self.cfg = cfg
        self.is_global = cfg.is_global(layer)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.scale = cfg.query_pre_attn_scalar**-0.5

    def forward(self, x, cos, sin, mask, keep, k_cache, v_cache, kernel=None):
        cfg = self.cfg
        b, t, _ = x.shape
        kv, rep, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        # -1 for the token dimension throughout: XNNPACK refuses a reshape to a symbolic shape, and
        # each refusal ends a partition in the ExecuTorch program
        q = self.q_norm(self.q_proj(x).view(b, -1, cfg.num_heads, d))
        k = self.k_norm(self.k_proj(x).view(b, -1, kv, d))
        if kernel is not None and cos is None:  # the kernel rotates q and k itself: no transposes either
            out, new_k, new_v = kernel(q.reshape(b, -1, cfg.q_dim), k.reshape(b, -1, cfg.kv_dim), self.v_proj(x),
                                       k_cache, v_cache, self.is_global, self.scale)
            return self.o_proj(out), new_k, new_v
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, -1, kv, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kernel is not None:  # a runtime's fused attention, updating its cache buffers in place
            flat = lambda y: y.transpose(1, 2).reshape(b, -1, y.shape[1] * d)  # noqa: E731
            out, new_k, new_v = kernel(flat(q), flat(k), flat(v), k_cache, v_cache, self.is_global, self.scale)
            return self.o_proj(out), new_k, new_v
        if self.kv_dtype == "int8":  # the quantized kernel also rounds the queries per token and head
            q, k, v = int8_per_token(q), int8_per_token(k), int8_per_token(v)
        elif self.kv_dtype == "fp16":  # the kernel takes fp16 queries beside fp16 caches (its arithmetic in
            # fp16 is its own: the rounding of the inputs is what the reference can share)
            q, k, v = (y.to(torch.float16).to(y.dtype) for y in (q, k, v))
        keys = torch.cat((k_cache, k), dim=2)  # [b, kv, S+T, d]
        values = torch.cat((v_cache, v), dim=2)
        # Grouped-query attention by grouping query heads per KV head (no repeat of K/V):
        # [b, H, T, d] -> [b, kv, rep*T, d]. Converters handle this batched matmul exactly,
        # unlike repeat_kv with one KV head (see STACK-NOTES).
        qg = (q * self.scale).reshape(b, kv, rep * t, d)
        scores = torch.matmul(qg, keys.transpose(2, 3)) + mask
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        out = torch.matmul(probs, values).reshape(b, cfg.num_heads, t, d)
        out = out.transpose(1, 2).reshape(b, t, cfg.q_dim)
        new_k = torch.index_select(keys, 2, keep)
        new_v = torch.index_select(values, 2, keep)
        return self.o_proj(out), new_k, new_v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos, sin, mask, keep, k_cache, v_cache, kernel=None):
        h, k_cache, v_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, keep, k_cache, v_cache, kernel)
        x = x + self.post_attention_layernorm(h)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, k_cache, v_cache


class Gemma3(nn.Module):
    """Gemma 3 text decoder with per-layer-type cache lengths.

    Two halves: `embed(tokens)` turns token ids into the residual stream, and `decode(x, pos,
    length, caches)` runs the decoder layers and the head on any embeddings (text, or image soft
    tokens placed among them). `step(tokens, ...)` is both, the single traced computation: the
    prefill and decode entry points are this step at T = prefill length and T = 1.
    """

    mask_value = NEG_INF  # what a masked score gets (see npu_forms)
    residual_scale = 1.0  # the residual stream is carried divided by this (see npu_forms)

    def __init__(self, cfg: Gemma3Config, max_context: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.max_context = cfg.runtime_context(max_context)
        # extra (masked) slots on every local cache, for runtimes that allocate window + slack
        self.local_slack = 0
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied
        self.register_buffer(
            "inv_freq_local", rope_inv_freq(cfg.head_dim, cfg.rope_local_base, 1.0), persistent=False
        )
        self.register_buffer(
            "inv_freq_global",
            rope_inv_freq(cfg.head_dim, cfg.rope_global_base, cfg.rope_global_scaling),
            persistent=False,
        )

    @property
    def kv_dtype(self) -> str:
        """What the global layers' KV caches hold (local layers' rings stay fp32: see set_kv_dtype)."""
        return next((layer.self_attn.kv_dtype for layer in self.layers if layer.self_attn.is_global), "fp32")

    def set_kv_dtype(self, kv_dtype: str) -> None:
        """What the global layers' KV caches hold: "fp32", "fp16", or "int8" (see int8_per_token); a
        runtime attention kernel reads it per layer to lay out its caches. Local layers keep fp32
        rings: they hold one window whatever the context, so a narrower dtype saves little memory,
        while ExecuTorch's fp16 and int8 attention kernels read a slot several times slower than
        its fp32 one (benchmarks/results/profile-270m-int4-b32-rtn-kv-*.json)."""
        for layer in self.layers:
            layer.self_attn.kv_dtype = kv_dtype if layer.self_attn.is_global else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        """Activation/cache dtype (read from a norm: the embedding may hold integer codes)."""
        return self.norm.weight.dtype

    # --- cache ---------------------------------------------------------------------------
    def cache_lengths(self) -> list[int]:
        cfg, ctx = self.cfg, self.max_context
        return [cfg.cache_len(i, ctx) if cfg.is_global(i) else min(cfg.cache_len(i, ctx) + self.local_slack, ctx)
                for i in range(cfg.num_layers)]

    def cache_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the flat cache list [k0, v0, k1, v1, ...]."""
        c = self.cfg
        shapes = []
        for n in self.cache_lengths():
            shapes += [(1, c.num_kv_heads, n, c.head_dim)] * 2
        return shapes

    def new_cache(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        dtype = dtype or self.dtype
        return [torch.zeros(s, dtype=dtype) for s in self.cache_shapes()]

    # --- the step ------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor, is_global: bool, dtype):
        lookup = getattr(self, "rope_lookup", None)  # see npu_forms
        if lookup is not None:
            cos, sin = (torch.index_select(t, 0, positions) for t in lookup[is_global])
            return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)
        inv_freq = self.inv_freq_global if is_global else self.inv_freq_local
        # the frequencies doubled before the product, not the angles after: XNNPACK takes no cat of
        # one tensor with itself, and the angles are the same products either way
        emb = positions.float()[:, None] * torch.cat((inv_freq, inv_freq))[None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rope_tables(self, is_global: bool, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position's angles, [positions, head_dim / 2] (the half the
        rotation repeats), for kernels that apply RoPE themselves; the same values `_rope` uses."""
        inv_freq = self.inv_freq_global if is_global else self.inv_freq_local
        freqs = torch.arange(positions, dtype=torch.int32).float()[:, None] * inv_freq[None, :]
        return freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)

    def _mask(self, q_pos, cache_len: int, t: int, window: int | None, rep: int, groups=None):
        """Additive mask [rep*T, S+T] for queries at q_pos over [cache slots, new tokens]; with
        `groups` ([T], image view per token or -1), a view's tokens also see its later tokens."""
        start = q_pos[:1] - cache_len
        k_pos = torch.cat((start + torch.arange(cache_len, dtype=q_pos.dtype), q_pos))
        diff = q_pos[:, None] - k_pos[None, :]
        ok = (k_pos[None, :] >= 0) & (diff >= 0)
        if window is not None:
            ok = ok & (diff < window)
        if groups is not None:
            same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
            ok = ok | torch.cat((torch.zeros(t, cache_len, dtype=torch.bool), same), dim=1)
        mask = torch.where(ok, 0.0, self.mask_value)
        return mask.repeat(rep, 1) if rep > 1 else mask

    def embed(self, tokens):
        """Token ids [1, T] -> the residual stream entering layer 0, [1, T, hidden]."""
        return self.embed_tokens(tokens) * torch.tensor(math.sqrt(self.cfg.hidden_size) / self.residual_scale,
                                                        dtype=self.dtype)

    def decode(self, x, pos, length, caches, all_logits: bool = True, hidden: bool = False, head: bool = True,
               attention=None, groups=None):
        """x [1, T, hidden] embeddings, pos [1] int (position of x[:, 0]), length [1] int (valid
        positions of a padded chunk), caches the flat list [k0, v0, k1, v1, ...].

        Returns (logits [1, T or 1, V], new caches). With all_logits=False only the logits of
        the last valid position are computed. With hidden=True a third result is the residual
        stream entering layer 0 and after each layer, [L + 1, T, hidden] (the debug output
        `verify --locate` uses to find the first diverging layer). head=False skips the output
        head (logits None) for a graph that only wants the residual stream.

        `attention` replaces the sliding-cache attention by a runtime's own kernel, called per layer
        as attention(q, k, v, k_cache, v_cache, is_global, scale) with q/k/v [1, T, heads*head_dim]
        after QK-norm and RoPE; it returns (out, new k_cache, new v_cache) and owns the cache
        layout and masking (an unpadded chunk only). A kernel with `rotary = True` gets q and k
        before RoPE and rotates them itself (from `rope_tables`).

        `groups` [T] int marks image soft tokens by view (-1 for text, see vision.image_groups):
        a view's tokens attend to each other in both directions. A view must lie within one chunk.
        """
        cfg = self.cfg
        t = x.shape[1]
        dtype = self.dtype
        q_pos = pos + torch.arange(t, dtype=pos.dtype)
        rep = cfg.num_heads // cfg.num_kv_heads
        if getattr(attention, "rotary", False):
            ropes = {False: (None, None), True: (None, None)}
        else:
            ropes = {
                False: self._rope(q_pos, False, dtype),
                True: self._rope(q_pos, True, dtype),
            }
        lengths = self.cache_lengths()
        masks, keeps = {}, {}
        if groups is not None and attention is not None:
            raise ConfigError("a runtime attention kernel cannot take the image tokens' bidirectional mask")
        if attention is None:  # a runtime kernel masks and places the keys itself
            for s, is_global in {(n, cfg.is_global(i)) for i, n in enumerate(lengths)}:
                window = None if is_global else cfg.sliding_window
                masks[(s, is_global)] = self._mask(q_pos, s, t, window, rep, groups).to(dtype)
                keeps[s] = length + torch.arange(s, dtype=length.dtype)
        new_caches, states = [], [x[0]]
        for i, layer in enumerate(self.layers):
            g, s = cfg.is_global(i), lengths[i]
            cos, sin = ropes[g]
            x, k, v = layer(x, cos, sin, masks.get((s, g)), keeps.get(s), caches[2 * i], caches[2 * i + 1], attention)
            new_caches += [k, v]
            states.append(x[0])
        if not all_logits:
            x = torch.index_select(x, 1, length - 1)
        logits = self.lm_head(self.norm(x)) if head else None
        if hidden:
            return logits, new_caches, torch.stack(states)
        return logits, new_caches

    def step(self, tokens, pos, length, caches, **options):
        """decode(embed(tokens), ...): tokens [1, T] int; the options are decode's."""
        return self.decode(self.embed(tokens), pos, length, caches, **options)

    def forward(self, tokens, pos, length, caches):
        return self.step(tokens, pos, length, caches)
