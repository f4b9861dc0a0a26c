"""Gemma 3 text-decoder configuration: one frozen dataclass, sizes as data, and the named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError

SLIDING = "sliding"
GLOBAL = "global"
# Runtime caches default to this many positions (capped at the model's own limit): global-layer
# caches are max_context long, and every step reads them whole.
DEFAULT_CONTEXT = 4096


def from_fields(cls, d: dict, what: str):
    """A frozen dataclass from a dict, refusing names it does not have (a typo is not a default)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what} {sorted(unknown)}")
    return cls(**d)


@dataclass(frozen=True)
class Gemma3Config:
    """Architecture of a Gemma 3 text decoder.

    Every field is a published hyper-parameter; `layer_types` is derived from
    `global_every` unless given explicitly (checkpoints may carry their own list).
    """

    name: str
    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 512
    max_position_embeddings: int = 32_768
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rope_global_scaling: float = 1.0  # linear factor applied to global layers only (4B+: 8)
    rms_norm_eps: float = 1e-6
    global_every: int = 6
    layer_types: tuple[str, ...] = ()
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if not self.layer_types:
            types = tuple(
                GLOBAL if (i + 1) % self.global_every == 0 else SLIDING for i in range(self.num_layers)
            )
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "sliding_window", "max_position_embeddings",
        )
        for field in positive:
            if int(getattr(self, field)) <= 0:
                raise ConfigError(f"config {self.name!r}: {field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config {self.name!r}: num_heads ({self.num_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"config {self.name!r}: {len(self.layer_types)} layer types for {self.num_layers} layers"
            )
        bad = set(self.layer_types) - {SLIDING, GLOBAL}
        if bad:
            raise ConfigError(f"config {self.name!r}: unknown layer types {sorted(bad)}")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def is_global(self, layer: int) -> bool:
        return self.layer_types[layer] == GLOBAL

    def runtime_context(self, requested: int | None = None) -> int:
        """The context a runtime cache is built for: `requested`, or the default capped at the model's limit."""
        ctx = int(requested or min(DEFAULT_CONTEXT, self.max_position_embeddings))
        if not 1 <= ctx <= self.max_position_embeddings:
            raise ConfigError(f"max context {ctx} is outside 1..{self.max_position_embeddings} for {self.name}")
        return ctx

    def cache_len(self, layer: int, max_context: int) -> int:
        """Positions a layer's KV cache keeps: the window for local layers, max_context for global."""
        if self.is_global(layer):
            return max_context
        return min(self.sliding_window, max_context)

    def param_counts(self) -> dict[str, int]:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        mlp = 3 * h * i
        norms = 4 * h + 2 * self.head_dim
        embed = self.vocab_size * h
        return {
            "embedding": embed,
            "attention": attn * L,
            "mlp": mlp * L,
            "norms": norms * L + h,
            "total": embed + (attn + mlp + norms) * L + h,
        }

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Gemma3Config":
        return from_fields(cls, d, "config fields")

    def replace(self, **changes) -> "Gemma3Config":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Gemma3Config] = {
    "gemma3-270m": Gemma3Config(
        name="gemma3-270m", hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4,
        num_kv_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32_768,
    ),
    "gemma3-1b": Gemma3Config(
        name="gemma3-1b", hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
        num_kv_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32_768,
    ),
    "gemma3-4b": Gemma3Config(
        name="gemma3-4b", hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8,
        num_kv_heads=4, head_dim=256, sliding_window=1024, max_position_embeddings=131_072,
        rope_global_scaling=8.0,
        vocab_size=262_208,  # the text vocabulary and the image tokens
    ),
    "gemma3-12b": Gemma3Config(
        name="gemma3-12b", hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16,
        num_kv_heads=8, head_dim=256, sliding_window=1024, max_position_embeddings=131_072,
        rope_global_scaling=8.0,
        vocab_size=262_208,  # the text vocabulary and the image tokens
    ),
    "gemma3-27b": Gemma3Config(
        name="gemma3-27b", hidden_size=5376, intermediate_size=21504, num_layers=62, num_heads=32,
        num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168.0, sliding_window=1024,
        max_position_embeddings=131_072, rope_global_scaling=8.0,
        vocab_size=262_208,  # the text vocabulary and the image tokens
    ),
    # Tests: one local and one global layer, a window far smaller than the test sequences,
    # the real vocabulary so the real tokenizer works with it, and one KV head like 270M/1B.
    "tiny": Gemma3Config(
        name="tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=32, query_pre_attn_scalar=32.0, sliding_window=16,
        max_position_embeddings=1024, global_every=2,
    ),
}


def preset(name: str) -> Gemma3Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
