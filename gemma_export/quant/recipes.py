"""Quantization recipes as data.

A recipe is an ordered list of (module-name pattern -> scheme) rules; the first rule whose
pattern matches a module's name decides its scheme (None keeps it float). Recipes round-trip to
JSON and TOML, and a TOML file is how users express a new quantization, not a new flag.
Norms, residual adds and the final logits always stay fp32: only linear layers and the
(tied) embedding table are ever matched.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import ConfigError
from ..gemma3 import family

ACTIVATIONS = ("float", "int8-dynamic", "int8-static", "int16-static")
# rtn: max-abs scales, round to nearest. search: per-block scales chosen to minimise the rounding
# error weighted by each input column's calibrated mean square, then round to nearest.
# gptq: search's scales, then GPTQ's error-compensating rounding; gptq-act: the same, rounding the
# columns with the largest inputs first (activation order). source: the checkpoint's own codes,
# unchanged (quant.source); a tensor that holds none is rounded to nearest with the rule's scheme.
ALGORITHMS = ("rtn", "search", "gptq", "gptq-act", "source")
GRANULARITIES = ("channel", "block")
KV_DTYPES = ("fp32", "fp16", "int8")  # what a recipe's KV caches hold


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits of a parity comparison (None: not checked). A recipe carries the limits
    `verify` applies to its artifacts; the judge (verification.judge) applies them."""

    min_top1: float | None = 0.999
    min_top5: float | None = None
    max_mean_kl: float | None = None
    max_abs_diff: float | None = None
    min_cosine: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"invalid thresholds: {e}") from None


@dataclass(frozen=True)
class Scheme:
    """How one weight matrix is quantized: signed integer codes, weight = (code - zero) x scale with
    zero = 0 (symmetric) unless the codes come from a source that stores a minimum per block."""

    bits: int = 8
    granularity: str = "channel"  # per output channel (per row for the embedding), or per block
    block_size: int = 0  # 32 / 64 / 128 when granularity == "block" (16: source codes only)
    activations: str = "float"
    algorithm: str = "rtn"
    symmetric: bool = True  # False: float zero points per block (source codes only)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"weight bits must be 4 or 8, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "block" and self.block_size not in (32, 64, 128) and not (
                self.block_size == 16 and self.algorithm == "source"):
            raise ConfigError(f"block size must be 32, 64 or 128, got {self.block_size}")
        if self.granularity == "channel" and self.block_size:
            raise ConfigError("per-channel schemes take no block size")
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if not self.symmetric and self.algorithm != "source":
            raise ConfigError("zero points (symmetric = false) come only from a source's codes (algorithm source)")

    @property
    def label(self) -> str:
        g = "pc" if self.granularity == "channel" else f"b{self.block_size}"
        return f"w{self.bits}{g}{'' if self.symmetric else '-asym'}-{self.activations}-{self.algorithm}"


@dataclass(frozen=True)
class Rule:
    pattern: str  # fnmatch pattern over module names, e.g. "layers.*.mlp.*" or "embed_tokens"
    scheme: Scheme | None  # None: keep float


@dataclass(frozen=True)
class Calibration:
    samples: int = 64
    seq_len: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Mix:
    """A size budget spent per tensor (quant.mixed): every tensor starts at its rule's scheme, and
    the tensors whose rounding costs the most loss per extra byte get `upgrade` until the model's
    weights reach `budget` bytes per parameter (16-bit scales, embedding included)."""

    budget: float  # bytes per parameter
    upgrade: Scheme
    samples: int = 16  # calibration samples whose gradients measure each tensor's sensitivity

    def __post_init__(self):
        if not 0.0 < self.budget <= 4.0:
            raise ConfigError(f"mix budget must be in (0, 4] bytes per parameter, got {self.budget}")
        if self.samples < 1:
            raise ConfigError(f"mix samples must be positive, got {self.samples}")
        if self.upgrade.algorithm == "source":
            raise ConfigError("a mix upgrades by rounding; algorithm source keeps codes instead")


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    rules: tuple[Rule, ...] = ()
    calibration: Calibration = field(default_factory=Calibration)
    # SmoothQuant strength (0 = off): activation outliers moved into the weights before quantizing
    smoothing: float = 0.0
    # parity thresholds against the fp32 reference that `verify` applies to this recipe
    thresholds: Thresholds = field(default_factory=Thresholds)
    description: str = ""
    # a byte budget spent per tensor before quantizing (quant.mixed turns it into one rule per tensor)
    mix: Mix | None = None
    # the float arithmetic of an unquantized recipe: fp16 is what NPUs compute floats in
    compute_dtype: str = "fp32"
    # what the KV caches hold: fp16, or int8 codes with a scale and zero point per token and KV head
    # (the runtime's attention kernel then rounds queries, keys and values itself, its own way)
    kv_dtype: str = "fp32"

    def scheme_for(self, module_name: str) -> Scheme | None:
        for rule in self.rules:
            if fnmatch.fnmatchcase(module_name, rule.pattern):
                return rule.scheme
        return None

    def __post_init__(self):
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"recipe {self.name!r}: smoothing must be in [0, 1), got {self.smoothing}")
        if self.mix is not None and (self.uses_source or self.is_float):
            raise ConfigError(f"recipe {self.name!r}: a mix budget needs rounding rules to start from")
        if self.compute_dtype not in ("fp32", "fp16"):
            raise ConfigError(f"recipe {self.name!r}: compute_dtype must be fp32 or fp16, got {self.compute_dtype!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"recipe {self.name!r}: kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.compute_dtype != "fp32" and not self.is_float:
            raise ConfigError(f"recipe {self.name!r}: compute_dtype {self.compute_dtype} is for unquantized recipes")

    @property
    def is_float(self) -> bool:
        return all(r.scheme is None for r in self.rules)

    @property
    def runtime_quantizes_activations(self) -> bool:
        """Whether the runtime's kernels quantize activations themselves (int8-dynamic): they then
        round their own way, and artifacts are judged against fp32 relative to the recipe."""
        return self.kv_dtype != "fp32" or any(
            r.scheme is not None and r.scheme.activations == "int8-dynamic" for r in self.rules)

    @property
    def needs_calibration(self) -> bool:
        return self.smoothing > 0 or self.mix is not None or any(
            r.scheme and (r.scheme.algorithm not in ("rtn", "source") or r.scheme.activations.endswith("static"))
            for r in self.rules)

    @property
    def uses_source(self) -> bool:
        """Whether the recipe keeps a checkpoint's own codes (resolved per tensor by quant.source)."""
        return any(r.scheme is not None and r.scheme.algorithm == "source" for r in self.rules)

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["rules"] = [{"pattern": r.pattern, "scheme": asdict(r.scheme) if r.scheme else "float"} for r in self.rules]
        if self.mix is None:
            del d["mix"]
        if self.compute_dtype == "fp32":  # the default, left out as in manifests written before it
            del d["compute_dtype"]
        if self.kv_dtype == "fp32":  # likewise
            del d["kv_dtype"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantRecipe":
        try:
            rules = tuple(
                Rule(r["pattern"], None if r.get("scheme", "float") == "float" else Scheme(**r["scheme"]))
                for r in d.get("rules", ())
            )
            return cls(
                name=d["name"], rules=rules,
                calibration=Calibration(**d.get("calibration", {})),
                thresholds=Thresholds(**d.get("thresholds", {})),
                description=d.get("description", ""),
                smoothing=float(d.get("smoothing", 0.0)),
                compute_dtype=d.get("compute_dtype", "fp32"),
                kv_dtype=d.get("kv_dtype", "fp32"),
                mix=None if d.get("mix") is None else Mix(
                    **{**d["mix"], "upgrade": Scheme(**d["mix"]["upgrade"])}),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid recipe: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_toml(self) -> str:
        lines = [f"name = {json.dumps(self.name)}", f"description = {json.dumps(self.description)}",
                 f"smoothing = {self.smoothing}"]
        if self.compute_dtype != "fp32":
            lines.append(f"compute_dtype = {json.dumps(self.compute_dtype)}")
        if self.kv_dtype != "fp32":
            lines.append(f"kv_dtype = {json.dumps(self.kv_dtype)}")
        lines.append("")
        lines.append("[calibration]")
        lines += [f"{k} = {v}" for k, v in asdict(self.calibration).items()]
        lines += ["", "[thresholds]"]
        lines += [f"{k} = {v}" for k, v in asdict(self.thresholds).items() if v is not None]
        if self.mix is not None:
            inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in asdict(self.mix.upgrade).items())
            lines += ["", "[mix]", f"budget = {self.mix.budget}", f"samples = {self.mix.samples}",
                      f"upgrade = {{ {inner} }}"]
        for r in self.rules:
            lines += ["", "[[rules]]", f"pattern = {json.dumps(r.pattern)}"]
            if r.scheme is None:
                lines.append('scheme = "float"')
            else:
                inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in asdict(r.scheme).items())
                lines.append(f"scheme = {{ {inner} }}")
        return "\n".join(lines) + "\n"


LINEARS = "layers.*"
EMBED = family.TABLE


def _int4(block: int, algorithm: str, description: str, thresholds: Thresholds) -> QuantRecipe:
    w4 = Scheme(bits=4, granularity="block", block_size=block, activations="int8-dynamic", algorithm=algorithm)
    # The embedding's activations are the head's input (the table itself is gathered). The
    # calibrated presets search the table's scales against the head's inputs but round to
    # nearest: GPTQ on the tied table helps the head and hurts the lookup (measured by
    # `python -m benchmarks.ablation --suite int4`; figures in the README).
    emb = Scheme(bits=4, granularity="block", block_size=block, activations="int8-dynamic",
                 algorithm="rtn" if algorithm == "rtn" else "search")
    name = f"int4-b{block}" + ("-rtn" if algorithm == "rtn" else "")
    return QuantRecipe(name, (Rule(EMBED, emb), Rule(LINEARS, w4)), thresholds=thresholds, description=description)


def _mixed(budget: float) -> QuantRecipe:
    base = _int4(32, "gptq-act", "", _LOOSE4)
    up = Scheme(bits=8, activations="int8-dynamic", algorithm="gptq-act")
    return replace(base, name="int4-mixed", mix=Mix(budget, up), description=(
        f"calibrated int4 block-32 (as int4-b32), with the tensors whose rounding costs the most loss per "
        f"byte in int8 per channel (GPTQ) until {budget} bytes per parameter"))


def _source(name: str, activations: str, thresholds: Thresholds, description: str) -> QuantRecipe:
    keep = Scheme(bits=8, activations=activations, algorithm="source")
    return QuantRecipe(name, (Rule(EMBED, keep), Rule(LINEARS, keep)), thresholds=thresholds, description=description)


def _static(name: str, activations: str, description: str, linear_bits: int = 8) -> QuantRecipe:
    table = Scheme(8, activations=activations)  # the tied table stays int8 (it is the head as well)
    # int4 per channel rounded to nearest leaves the 270M at 42% top-1 against fp32: calibrated instead
    linears = Scheme(linear_bits, activations=activations, algorithm="rtn" if linear_bits == 8 else "gptq-act")
    # static ranges hold only for the positions calibrated, so sequences run past the 270M/1B window
    # (the README's NPU section has the measurement)
    return QuantRecipe(name, (Rule(EMBED, table), Rule(LINEARS, linears)),
                       thresholds=_LOOSE4, description=description, calibration=Calibration(samples=16, seq_len=1024))


# A quantized artifact is verified against the same recipe applied in PyTorch (same codes), so
# these thresholds measure the lowering, not the quantization; `eval` measures the quantization.
# They judge recipes with float activations (int8-weights). Where the runtime quantizes
# activations itself (int8-dynamic), the judge compares artifact and recipe with fp32 instead
# (verification.judge): two faithful roundings differ as much as each differs from fp32.
_INT8 = Thresholds(min_top1=0.98, max_mean_kl=1e-2)
_LOOSE4 = Thresholds(min_top1=0.95, max_mean_kl=5e-2)
PRESETS: dict[str, QuantRecipe] = {r.name: r for r in (
    QuantRecipe("fp32", (), thresholds=Thresholds(min_top1=0.999, min_top5=0.99, max_mean_kl=1e-4),
                description="no quantization"),
    # NPUs compute floats in half precision (format qnn); fp16 rounding through every layer, so
    # looser than fp32's limits
    QuantRecipe("fp16", (), compute_dtype="fp16", thresholds=Thresholds(min_top1=0.95, max_mean_kl=2e-2),
                description="no quantization, computed in fp16 (NPUs)"),
    # smoothing trades a little perplexity for agreement with fp32 (`python -m benchmarks.ablation`)
    QuantRecipe("int8", (Rule(EMBED, Scheme(8, activations="int8-dynamic")),
                         Rule(LINEARS, Scheme(8, activations="int8-dynamic"))),
                thresholds=_INT8, smoothing=0.5,
                description="int8 weights per channel (embedding per row), int8 dynamic activations, smoothed"),
    QuantRecipe("int8-weights", (Rule(EMBED, Scheme(8)), Rule(LINEARS, Scheme(8))),
                thresholds=_INT8,
                description="int8 weights per channel, float activations"),
    # GPTQ rounding the largest-input columns first, layer by layer: the best of the int4
    # algorithms in `python -m benchmarks.ablation --suite int4`
    _int4(32, "gptq-act", "calibrated int4 block-32 weights (GPTQ, act-order; table: scale search), "
          "int8 dynamic activations", _LOOSE4),
    _int4(128, "gptq-act", "calibrated int4 block-128 weights (GPTQ, act-order; table: scale search), "
          "int8 dynamic activations", _LOOSE4),
    _int4(32, "rtn", "round-to-nearest int4 block-32 (baseline)", _LOOSE4),
    # a GGUF's own codes (quant.source): exact where the format stores the type, so the limits are
    # those of an unquantized export; float tensors fall back to int8 per channel
    _source("source", "float", Thresholds(min_top1=0.999, max_mean_kl=1e-6),
            "the checkpoint's own codes unchanged (GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K), float "
            "activations; float tensors: int8 per channel"),
    # XNNPACK's integer kernels take only their own dynamic int8 activations (pte, tflite)
    _source("source-dynamic", "int8-dynamic", Thresholds(min_top1=0.995, max_mean_kl=1e-3),
            "the checkpoint's own codes, int8 dynamic activations (the integer kernels of XNNPACK, which "
            "take positive bf16 block scales: a 4-bit block with a negative scale keeps its values with "
            "the sign in the codes, except a -8 code, which becomes 7); float tensors: int8 per channel"),
    _int4(128, "rtn", "round-to-nearest int4 block-128 (baseline)", _LOOSE4),
    # the budget for the 1B; the upgrade is the scheme every format lowers beside int4
    _mixed(0.62),
    # NPUs (format qnn): static per-tensor activation ranges. In PyTorch only each linear's input
    # is quantized; the QDQ graph quantizes every activation, so the judge's bounds are loose
    _static("a16w8", "int16-static", "int8 weights per channel, static 16-bit activations (NPUs)"),
    _static("a8w8", "int8-static", "int8 weights per channel, static 8-bit activations (NPUs)"),
    _static("a16w4", "int16-static", "int4 weights per channel (GPTQ, act-order; table: int8), static 16-bit activations (NPUs)", 4),
)}


def with_kv_dtype(recipe: QuantRecipe, kv_dtype: str | None) -> QuantRecipe:
    """The recipe with its KV caches in `kv_dtype` (None: as it is), named for it: int4-b32 with
    int8 caches is "int4-b32+kv-int8" in the manifest and verify's report."""
    if kv_dtype is None or kv_dtype == recipe.kv_dtype:
        return recipe
    base = recipe.name.removesuffix(f"+kv-{recipe.kv_dtype}")
    description = recipe.description.removesuffix(_KV_NOTES.get(recipe.kv_dtype, ""))
    if kv_dtype == "fp32":
        return replace(recipe, kv_dtype=kv_dtype, name=base, description=description)
    return replace(recipe, kv_dtype=kv_dtype, name=f"{base}+kv-{kv_dtype}", description=description + _KV_NOTES[kv_dtype])


_KV_NOTES = {"fp16": "; global layers' KV caches fp16", "int8": "; global layers' KV caches int8 per token and head"}


def resolve(ref) -> QuantRecipe:
    """A preset name, a .toml / .json recipe file, or a recipe dict (as stored in a manifest)."""
    if isinstance(ref, QuantRecipe):
        return ref
    if ref is None:
        return PRESETS["fp32"]
    if isinstance(ref, dict):  # a bare {"name": preset} stands for the preset
        return PRESETS[ref["name"]] if set(ref) == {"name"} and ref["name"] in PRESETS else QuantRecipe.from_dict(ref)
    if ref in PRESETS:
        return PRESETS[ref]
    path = Path(ref)
    if path.suffix in (".toml", ".json"):
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        try:
            data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from None
        return QuantRecipe.from_dict(data)
    raise ConfigError(f"unknown recipe {ref!r}; presets: {', '.join(PRESETS)} (or a .toml/.json file)")
