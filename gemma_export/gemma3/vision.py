"""Gemma 3's vision path: the SigLIP encoder and the projector into the text model's embeddings,
sizes as data, and how image soft tokens enter a prompt.

pixels [N, 3, S, S] -> patch embeddings (S/patch)^2 per view -> encoder -> average-pooled to
`tokens_per_image` -> RMSNorm (1 + w) -> projected to the text hidden size. In the prompt each
view is `<start_of_image>`, `tokens_per_image` image tokens, `<end_of_image>`; the decoder gets
the projected embeddings in place of the image tokens' (unscaled: they replace the scaled token
embeddings), and a view's tokens attend to each other in both directions.

Parameter names follow Hugging Face's Gemma 3 checkpoints below `vision_tower.vision_model.` and
`multi_modal_projector.` (see `hf_vision_param_name`), so a checkpoint maps by prefix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import from_fields
from .model import RMSNorm, gelu_tanh


@dataclass(frozen=True)
class VisionConfig:
    """A SigLIP vision encoder and Gemma 3's projector; every field a published hyper-parameter."""

    name: str
    image_size: int = 896
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    tokens_per_image: int = 256
    text_hidden_size: int = 2560
    boi_token_id: int = 255_999  # <start_of_image>
    eoi_token_id: int = 256_000  # <end_of_image>
    image_token_id: int = 262_144  # <image_soft_token>, a placeholder the embeddings replace

    def __post_init__(self) -> None:
        for f in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "tokens_per_image", "text_hidden_size"):
            if int(getattr(self, f)) <= 0:
                raise ConfigError(f"vision config {self.name!r}: {f} must be positive, got {getattr(self, f)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision config {self.name!r}: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        side = math.isqrt(self.tokens_per_image)
        if side * side != self.tokens_per_image or self.patches_per_side % side:
            raise ConfigError(f"vision config {self.name!r}: {self.tokens_per_image} tokens do not pool evenly "
                              f"from {self.patches_per_side}x{self.patches_per_side} patches")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision config {self.name!r}: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_heads {self.num_heads}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool(self) -> int:
        return self.patches_per_side // math.isqrt(self.tokens_per_image)

    def param_count(self) -> int:
        h, i, p = self.hidden_size, self.intermediate_size, self.patch_size
        layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h
        return 3 * p * p * h + h + self.patches_per_side ** 2 * h + layer * self.num_layers + 2 * h \
            + h + h * self.text_hidden_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return from_fields(cls, d, "vision config fields")


VISION_PRESETS: dict[str, VisionConfig] = {
    # the SigLIP-So400m tower shared by the 4B, 12B and 27B; only the projection width differs
    "gemma3-4b": VisionConfig(name="gemma3-4b", text_hidden_size=2560),
    "gemma3-12b": VisionConfig(name="gemma3-12b", text_hidden_size=3840),
    "gemma3-27b": VisionConfig(name="gemma3-27b", text_hidden_size=5376),
    # tests: 4x4 patches pooled to 2x2 tokens, projecting into the tiny text model
    "tiny": VisionConfig(name="tiny", image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=2, tokens_per_image=4, text_hidden_size=64),
}


def vision_preset(name: str) -> VisionConfig:
    try:
        return VISION_PRESETS[name]
    except KeyError:
        raise ConfigError(f"{name!r} has no vision encoder; models with one: {', '.join(VISION_PRESETS)}") from None


class _Embeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.patches_per_side ** 2, c.hidden_size)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [N, patches, hidden], row-major patches
        return x + self.position_embedding.weight[None]


class _Attention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = c.num_heads, c.hidden_size // c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):
        n, t, h = x.shape
        split = lambda y: y.view(n, t, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = torch.matmul(q * self.head_dim ** -0.5, k.transpose(2, 3))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        return self.out_proj(torch.matmul(probs, v).transpose(1, 2).reshape(n, t, h))


class _MLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    plain = False  # GELU written out (see model.plain_forms)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x), self.plain))


class _Layer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = _Attention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _MLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_layers))


class _Projector(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.mm_soft_emb_norm = RMSNorm(c.hidden_size, c.layer_norm_eps)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(c.hidden_size, c.text_hidden_size))

    def forward(self, x):
        n, _, h = x.shape
        side = self.c.patches_per_side
        grid = x.transpose(1, 2).reshape(n, h, side, side)
        pooled = F.avg_pool2d(grid, self.c.pool).flatten(2).transpose(1, 2)  # [N, tokens, hidden]
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight)


class Gemma3Vision(nn.Module):
    """pixels [N, 3, S, S] -> image soft-token embeddings [N, tokens_per_image, text hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.projector = _Projector(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ConfigError(f"vision encoder {self.cfg.name!r} takes pixels [N, 3, {s}, {s}], got "
                              f"{list(pixels.shape)}")
        return self.projector(self.features(pixels))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The encoder alone: pixels -> patch features [N, patches, width] (before the projector)."""
        x = self.embeddings(pixels.to(self.post_layernorm.weight.dtype))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


def random_vision(cfg: VisionConfig, seed: int = 0) -> Gemma3Vision:
    """Seeded random weights at a checkpoint-like scale (norm weights near zero: (1 + w))."""
    g = torch.Generator().manual_seed(seed)
    v = Gemma3Vision(cfg).eval()
    with torch.no_grad():
        for name, p in v.named_parameters():
            if name.endswith("mm_soft_emb_norm.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "layer_norm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
                if name.endswith("mm_input_projection_weight"):
                    fan_in = p.shape[0]
                elif name.endswith("patch_embedding.weight"):
                    fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return v


# --- checkpoints ---------------------------------------------------------------------------

# checkpoints on disk spell `vision_tower.vision_model.`; transformers 5 saves without `vision_model.`
_VISION_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                    "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def hf_vision_param_name(key: str) -> str | None:
    """Our vision parameter name for a Hugging Face Gemma 3 tensor name; None for other tensors."""
    for p in _VISION_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    for p in _PROJECTOR_PREFIXES:
        if key.startswith(p):
            return "projector." + key[len(p):]
    return None


def hf_vision_config(raw: dict, name: str) -> VisionConfig | None:
    """The vision config of a Hugging Face Gemma 3 config.json; None for a text-only model."""
    v = raw.get("vision_config")
    if not isinstance(v, dict):
        return None
    base = VisionConfig(name=name)
    text = raw.get("text_config") or {}
    return VisionConfig(
        name=name,
        image_size=int(v.get("image_size", base.image_size)), patch_size=int(v.get("patch_size", base.patch_size)),
        hidden_size=int(v.get("hidden_size", base.hidden_size)),
        intermediate_size=int(v.get("intermediate_size", base.intermediate_size)),
        num_layers=int(v.get("num_hidden_layers", base.num_layers)),
        num_heads=int(v.get("num_attention_heads", base.num_heads)),
        layer_norm_eps=float(v.get("layer_norm_eps", base.layer_norm_eps)),
        tokens_per_image=int(raw.get("mm_tokens_per_image", base.tokens_per_image)),
        text_hidden_size=int(text.get("hidden_size", base.text_hidden_size)),
        boi_token_id=int(raw.get("boi_token_index", base.boi_token_id)),
        eoi_token_id=int(raw.get("eoi_token_index", base.eoi_token_id)),
        image_token_id=int(raw.get("image_token_index", base.image_token_id)),
    )


# --- prompts ---------------------------------------------------------------------------------

def image_groups(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[T] ids -> [T] int: the index of the image view each image token belongs to (consecutive
    image tokens form one view), -1 for text. The decoder lets a view's tokens see each other."""
    is_image = ids == image_token_id
    starts = is_image & ~torch.cat((torch.zeros(1, dtype=torch.bool), is_image[:-1]))
    return torch.where(is_image, torch.cumsum(starts.long(), 0) - 1, -1)


def place(text_embeds: torch.Tensor, ids: torch.Tensor, images: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """text_embeds [1, T, h] with the image tokens' rows replaced, in order, by images [N, tokens, h]."""
    at = (ids == image_token_id).nonzero()[:, 0]
    flat = images.reshape(-1, images.shape[-1]).to(text_embeds.dtype)
    if at.numel() != flat.shape[0]:
        raise ConfigError(f"the prompt holds {at.numel()} image tokens for {flat.shape[0]} image embeddings")
    out = text_embeds.clone()
    out[0, at] = flat
    return out
