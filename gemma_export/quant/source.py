"""A checkpoint's own quantization codes, carried into an artifact unchanged.

A GGUF of llama.cpp's block types already holds integer codes and block scales; rounding those
weights again onto another grid throws quality away. `read_codes` decodes each quantized tensor
into codes, scales and (for the types that store a block minimum) float zero points, with
weight = (code - zero) x scale, and checks the result against the gguf package's own dequantizer.
`concrete` turns a recipe whose rules say `algorithm = "source"` into one rule per tensor with the
scheme that tensor's type needs; tensors that hold no codes (float tensors; safetensors weights
not exactly on a Q4_0 grid) are rounded to nearest with the rule's own scheme.

The codes are read through gguf's dequantizer itself: the same blocks with their scale fields set
to one (and minimums to zero) dequantize to the raw codes, so no bit layout is restated here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..gemma3 import family
from ..loading.checkpoints import _open_gguf, read_hf_folder
from ..loading.load import BUNDLED_PRESET, bundled_gguf, describe
from .recipes import QuantRecipe, Rule, Scheme


@dataclass(frozen=True)
class Kind:
    """How a GGUF block type is held exactly: code width, input columns per scale, zero points."""

    bits: int
    block: int
    symmetric: bool
    levels: int  # distinct codes the type stores (16, 32, 64, 256)

    def scheme(self, activations: str) -> Scheme:
        return Scheme(bits=self.bits, granularity="block", block_size=self.block, activations=activations,
                      algorithm="source", symmetric=self.symmetric)


# 5- and 6-bit codes are held as int8 codes (the same values); K-quants' 6-bit sub-block scales and
# minimums fold into fp32 block scales and zero points
KINDS = {
    "Q4_0": Kind(4, 32, True, 16), "Q4_1": Kind(4, 32, False, 16),
    "Q5_0": Kind(8, 32, True, 32), "Q5_1": Kind(8, 32, False, 32),
    "Q8_0": Kind(8, 32, True, 256),
    "Q4_K": Kind(4, 32, False, 16), "Q5_K": Kind(8, 32, False, 32), "Q6_K": Kind(8, 16, True, 64),
}
# a float tensor of a safetensors folder whose every block of 32 is exactly d x k, k in [-8, 7], with
# d = (its largest-magnitude value) / -8 (how Q4_0 and QAT "q4_0 unquantized" checkpoints place it)
GRID = "Q4_0-grid"
KINDS[GRID] = Kind(4, 32, True, 16)
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class SourceCodes:
    """One tensor's codes as the checkpoint stores them."""

    kind: str  # GGUF type name
    codes: np.ndarray  # int8 [out, in]
    scale: np.ndarray  # fp32 [out, in / block]
    zero: np.ndarray | None  # fp32 [out, in / block] (asymmetric types), else None


# --- decoding --------------------------------------------------------------------------------

def _unit(blocks: np.ndarray, kind: str) -> np.ndarray:
    """The blocks with every scale set to one and every minimum to zero (a copy)."""
    b = blocks.copy()
    one = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    if kind in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
        b[:, 0:2] = one
        if kind in ("Q4_1", "Q5_1"):
            b[:, 2:4] = 0
    elif kind in ("Q4_K", "Q5_K"):
        b[:, 0:2] = one
        b[:, 2:4] = 0
        # the twelve packed 6-bit sub-block scales / minimums: scales 1, minimums 0
        b[:, 4:16] = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], np.uint8)
    elif kind == "Q6_K":
        b[:, 192:208] = 1  # sixteen int8 sub-block scales
        b[:, 208:210] = one
    return b


def _halves(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32).reshape(-1)


def _scales(blocks: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Per block of KINDS[kind].block inputs: the scale and the minimum (weight = code x scale - minimum
    in gguf's own terms, codes as the unit-scale dequantization gives them)."""
    from gguf.quants import Q4_K

    d = _halves(blocks, 208 if kind == "Q6_K" else 0)
    if kind in ("Q4_0", "Q5_0", "Q8_0"):
        return d, None
    if kind in ("Q4_1", "Q5_1"):
        return d, -_halves(blocks, 2)
    if kind in ("Q4_K", "Q5_K"):
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        dmin = _halves(blocks, 2)
        return ((d[:, None] * sc.astype(np.float32)).reshape(-1),
                (dmin[:, None] * m.astype(np.float32)).reshape(-1))
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)  # Q6_K
    return (d[:, None] * sc).reshape(-1), None


def decode(data: np.ndarray, kind: str, out: int, inp: int) -> SourceCodes:
    """One GGUF tensor's raw blocks -> codes, scales and zero points, checked against gguf's dequantizer."""
    import gguf
    from gguf.quants import dequantize

    spec = KINDS[kind]
    qtype = gguf.GGMLQuantizationType[kind]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, block_bytes)
    raw = dequantize(_unit(blocks, kind), qtype).reshape(out, inp)
    scale, minimum = _scales(blocks, kind)
    scale, nb = scale.reshape(out, inp // spec.block), inp // spec.block
    half = spec.levels // 2  # unsigned codes centred on zero
    if spec.symmetric:
        codes, zero = raw, None
    else:  # unsigned codes 0..levels-1 -> signed; weight = s q - m = s (c - z) with z = m / s - half
        codes = raw - half
        minimum = minimum.reshape(out, nb)
        flat = scale == 0  # a constant block (-m): code 0 with scale 1 and zero m
        zero = np.where(flat, minimum, minimum / np.where(flat, 1, scale)) - np.where(flat, 0, half)
        scale = np.where(flat, np.float32(1), scale).astype(np.float32)
        codes = np.where(np.repeat(flat, spec.block, axis=1), 0, codes)
        zero = zero.astype(np.float32)
    if not np.array_equal(codes, np.round(codes)):  # a layout this reading does not understand
        raise CheckpointError(f"{kind} codes did not decode to integers")
    codes = codes.astype(np.int8)
    got = dequantize_codes(codes, scale, zero)
    want = dequantize(blocks, qtype).reshape(out, inp)
    # asymmetric: (c - z) s rounds differently from gguf's s q - m, by an ulp or so of the largest weight
    exact = (np.array_equal(got, want) if spec.symmetric
             else np.abs(got - want).max(initial=0) <= 1e-6 * max(float(np.abs(want).max(initial=0)), 1e-30))
    if not exact:
        raise CheckpointError(f"{kind} codes do not reproduce the tensor (max |diff| {np.abs(got - want).max():.3g})")
    return SourceCodes(kind, codes, scale.astype(np.float32), zero)


def dequantize_codes(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """algorithms.dequantize on numpy arrays."""
    import torch

    from .algorithms import dequantize

    z = None if zero is None else torch.from_numpy(np.ascontiguousarray(zero))
    return dequantize(torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(np.ascontiguousarray(scale)),
                      z).numpy()


# --- a checkpoint's tensors --------------------------------------------------------------------

def grid_codes(w: np.ndarray) -> SourceCodes | None:
    """A float weight [out, in] as Q4_0 codes when every block of 32 sits exactly on its grid, else None."""
    out, inp = w.shape
    if inp % 32:
        return None
    b = np.asarray(w, np.float32).reshape(out, inp // 32, 32)
    at = np.abs(b).argmax(-1)[..., None]
    d = np.take_along_axis(b, at, -1)[..., 0] / np.float32(-8)  # exact: a power-of-two division
    safe = np.where(d == 0, np.float32(1), d)
    k = np.round(b / safe[..., None])
    if not (np.array_equal(k * d[..., None], b) and k.min(initial=0) >= -8 and k.max(initial=0) <= 7):
        return None
    return SourceCodes(GRID, k.reshape(out, inp).astype(np.int8), d.astype(np.float32), None)


def _folder_weights(path: Path):
    """(module name, fp32 array) of a safetensors folder's 2-D weights, read from the mapped files."""
    for name, t, _ in read_hf_folder(path)[1]:
        if name.endswith(".weight") and t.ndim == 2:
            yield name[: -len(".weight")], t.float().numpy()


def checkpoint_of(source: str) -> Path | None:
    """The GGUF file or safetensors folder a model reference reads its weights from (the bundled
    preset's too), else None."""
    if source == BUNDLED_PRESET:
        return bundled_gguf()
    kind, path = describe(source)
    return path if kind in ("gguf", "hf") else None


def tensor_types(path: Path | None) -> dict[str, str]:
    """{module name: type} of the checkpoint's 2-D weights: a GGUF's own types; in a safetensors
    folder GRID for the weights found exactly on the Q4_0 grid, the dtype otherwise."""
    if path is None:
        return {}
    if path.is_dir():
        return {m: GRID if grid_codes(w) is not None else "F32" for m, w in _folder_weights(path)}
    out = {}
    for t in _open_gguf(path).tensors:
        name = family.gguf_param_name(t.name)
        if name is not None and name.endswith(".weight") and len(t.shape) == 2:
            out[name[: -len(".weight")]] = t.tensor_type.name
    return out


def as_stored_changes(scheme: Scheme) -> bool:
    """Whether `as_stored` changes a source's codes for this scheme (XNNPACK's 4-bit blocks)."""
    return (scheme.algorithm == "source" and scheme.bits == 4 and scheme.symmetric
            and scheme.activations == "int8-dynamic")


def as_stored(codes: SourceCodes, scheme: Scheme) -> SourceCodes:
    """The codes as the scheme's kernels hold them. int8-dynamic 4-bit blocks are XNNPACK's qb4w
    (pte, tflite), which takes only positive, bf16 scales: gguf's Q4_0 scale is negative whenever a
    block's largest magnitude is positive (that value holds code -8), so such a block's sign moves
    into its codes (-c: a -8 becomes 7, the one value not kept), a zero scale becomes the smallest
    fp16-normal one (its codes are all zero), and scales are rounded to bf16. Every other scheme
    keeps the codes as they are."""
    if not as_stored_changes(scheme):
        return codes
    import torch

    from .algorithms import MIN_SCALE

    scale = codes.scale
    negative = scale < 0
    flip = np.repeat(negative, scheme.block_size, axis=1)
    c = np.where(flip, np.minimum(-codes.codes.astype(np.int16), 7), codes.codes).astype(np.int8)
    scale = np.abs(scale)
    scale = np.where(scale == 0, np.float32(MIN_SCALE), scale)
    scale = torch.from_numpy(np.ascontiguousarray(scale, np.float32)).to(torch.bfloat16).float().numpy()
    return SourceCodes(codes.kind, c, scale, None)


def values_not_kept(codes: SourceCodes, scheme: Scheme) -> int:
    """How many of a tensor's values `as_stored` changes beyond its scale's bf16 rounding (the -8
    codes of negative-scale blocks, where signs are folded)."""
    if not as_stored_changes(scheme):
        return 0
    negative = np.repeat(codes.scale < 0, codes.codes.shape[1] // codes.scale.shape[1], axis=1)
    return int(np.sum((codes.codes == -8) & negative))


def read_codes(path: Path, names) -> dict[str, SourceCodes]:
    """{module name: SourceCodes} for the named modules whose tensors hold codes of a kept type."""
    wanted, out = set(names), {}
    if path.is_dir():
        for module, w in _folder_weights(path):
            if module in wanted and (codes := grid_codes(w)) is not None:
                out[module] = codes
        return out
    for t in _open_gguf(path).tensors:
        name = family.gguf_param_name(t.name)
        module = name[: -len(".weight")] if name and name.endswith(".weight") else None
        if module in wanted and t.tensor_type.name in KINDS:
            inp, rows = (int(d) for d in t.shape)
            try:
                out[module] = decode(t.data, t.tensor_type.name, rows, inp)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: tensor {t.name}: {e}") from None
    return out


def modules(cfg) -> list[str]:
    """The modules a recipe can quantize: the tied table and every decoder layer's linears."""
    return [family.TABLE] + [m for i in range(cfg.num_layers) for m in family.layer_linears(i)]


def resolve_for(recipe: QuantRecipe, model_source: str, cfg) -> QuantRecipe:
    """`concrete` for a model reference (preset, GGUF file or folder), before any weight is read."""
    if not recipe.uses_source:
        return recipe
    types = tensor_types(checkpoint_of(model_source))
    if not any(t in KINDS for t in types.values()):
        raise ConfigError(f"recipe {recipe.name}: {model_source} holds no quantization codes to keep (a GGUF of "
                          f"{', '.join(k for k in KINDS if k != GRID)} tensors, or safetensors weights exactly on "
                          "a Q4_0 grid); use a rounding recipe such as int4-b32")
    return concrete(recipe, types, modules(cfg))


def concrete(recipe: QuantRecipe, types: dict[str, str], modules) -> QuantRecipe:
    """The recipe with its `source` rules resolved per module (one exact-name rule each): a module
    whose tensor holds codes of a kept type gets that type's scheme, any other the rule's scheme
    rounded to nearest. Refuses types it cannot keep and cannot fall back from."""
    if not recipe.uses_source:
        return recipe
    rules = []
    for module in modules:
        scheme = recipe.scheme_for(module)
        if scheme is None or scheme.algorithm != "source":
            rules.append(Rule(module, scheme))
            continue
        kind = types.get(module)
        if kind in KINDS:
            rules.append(Rule(module, KINDS[kind].scheme(scheme.activations)))
        elif kind is None or kind in FLOAT_TYPES:
            rules.append(Rule(module, replace(scheme, algorithm="rtn")))
        else:
            raise ConfigError(f"recipe {recipe.name}: {module} is stored as {kind}, which the source recipe cannot "
                              f"keep (kept: {', '.join(KINDS)}; float tensors use the fallback scheme)")
    return replace(recipe, rules=tuple(rules))


def summary(recipe: QuantRecipe, types: dict[str, str]) -> dict[str, int]:
    """{"Q5_0 -> w8b32-float-source": count, ...}: what a concrete recipe does with each source type."""
    out: dict[str, int] = {}
    for rule in recipe.rules:
        key = f"{types.get(rule.pattern, 'float')} -> {rule.scheme.label if rule.scheme else 'float'}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


# --- making sources ----------------------------------------------------------------------------

def write_gguf(template: Path, dst: Path, tensors: dict, kind_of, overrides: dict | None = None) -> Path:
    """Write a GGUF with gguf's own quantizer: `tensors` {GGUF tensor name: fp32 array} (2-D as
    [out, in]), each stored as `kind_of(name, array)` ("Q4_0", ..., or "F32"); metadata (tokenizer,
    architecture) copied from `template` with `overrides` {key: value} applied. A stand-in for a
    QAT or llama.cpp file made from weights we have (tests, benchmarks)."""
    import gguf
    from gguf.quants import quantize

    reader = _open_gguf(template)
    writer = gguf.GGUFWriter(str(dst), "gemma3")
    overrides = dict(overrides or {})
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        main = field.types[0]
        sub = field.types[1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, overrides.pop(key, field.contents()), main, sub)
    if overrides:
        raise ConfigError(f"write_gguf: template {template.name} has no metadata {sorted(overrides)[0]!r}")
    for name, arr in tensors.items():
        kind = kind_of(name, arr) if arr.ndim == 2 else "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        data = np.ascontiguousarray(arr, np.float32)
        writer.add_tensor(name, data if kind == "F32" else quantize(data, qtype), raw_dtype=None if kind == "F32" else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def gguf_tensors(path: Path) -> dict:
    """{GGUF tensor name: fp32 array} of a GGUF, dequantized by gguf (its stored values, norms as 1 + w)."""
    from gguf.quants import dequantize

    return {t.name: np.asarray(dequantize(t.data, t.tensor_type), np.float32) for t in _open_gguf(path).tensors}


def model_tensors(model) -> dict:
    """{GGUF tensor name: fp32 array} of one of our models (norm weights as GGUF stores them, 1 + w)."""
    back = {v: k for k, v in family.GGUF_NAMES.items()}
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith(family.HEAD):
            continue
        arr = t.detach().float().numpy()
        if family.is_norm(name):
            arr = arr + family.GGUF_NORM_OFFSET
        if name == f"{family.TABLE}.weight":
            out["token_embd.weight"] = arr
        elif name == "norm.weight":
            out["output_norm.weight"] = arr
        else:
            _, layer, *mod, leaf = name.split(".")
            out[f"blk.{layer}.{back['.'.join(mod)]}.{leaf}"] = arr
    return out
