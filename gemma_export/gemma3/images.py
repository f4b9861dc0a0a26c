"""Gemma 3 image preprocessing in numpy and Pillow: pan-and-scan crops, resize to the encoder's
square, rescale and normalise.

The rules, defaults and arithmetic are those of transformers' Gemma 3 image processor (its Pillow
backend and the Gemma 3 processor's pan-and-scan defaults), so the pixels match it exactly: an
image with an alpha channel is composited on white, crops are cut from the original pixels, each
view is resized with Pillow's bilinear filter from 8-bit pixels, rescaled in float64 and stored
as float32, then normalised in float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ExportError
from .config import from_fields


class ImageError(ExportError):
    """An image file is missing, unreadable or not an image."""


@dataclass(frozen=True)
class ImageSettings:
    """How an image becomes encoder pixels; it travels in the artifact so a runtime repeats it."""

    size: int = 896  # the encoder's square input
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pan_and_scan: bool = False  # off by default, as in the Gemma 3 processor
    min_crop: int = 256  # no crop narrower than this many source pixels
    max_crops: int = 4
    min_ratio: float = 1.2  # aspect ratio from which an image is cropped

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.size <= 0 or self.min_crop <= 0 or self.max_crops < 2 or self.min_ratio < 1.0:
            raise ConfigError(f"image settings out of range: {self}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"image settings need three means and three positive deviations: {self}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSettings":
        return from_fields(cls, d, "image settings")

    def replace(self, **changes) -> "ImageSettings":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Views:
    """An image as the encoder sees it: the whole image first, then its pan-and-scan crops."""

    pixels: np.ndarray  # float32 [1 + crops, 3, size, size]
    boxes: tuple[tuple[int, int, int, int], ...]  # (left, top, right, bottom) in source pixels, per view

    @property
    def crops(self) -> int:
        return len(self.boxes) - 1


def crop_boxes(width: int, height: int, s: ImageSettings) -> list[tuple[int, int, int, int]]:
    """Pan-and-scan crops of a width x height image, left to right or top to bottom; [] when the
    image is not elongated enough or the crops would be smaller than `min_crop`."""
    long_, short = max(width, height), min(width, height)
    if long_ / short < s.min_ratio:
        return []
    # about as many crops as the aspect ratio (half rounds up), at least two, within the limits
    n = min(math.floor(long_ / short + 0.5), math.floor(long_ / s.min_crop))
    n = min(s.max_crops, max(2, n))
    step = math.ceil(long_ / n)
    if min(step, short) < s.min_crop:
        return []
    if width >= height:
        return [(i * step, 0, min((i + 1) * step, width), height) for i in range(n)]
    return [(0, i * step, width, min((i + 1) * step, height)) for i in range(n)]


def open_image(source):
    """A Pillow RGB image from a path or a Pillow image (alpha composited on white)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"image {path} cannot be read: {e}") from None
    else:
        image = source
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def to_pixels(view, s: ImageSettings) -> np.ndarray:
    """One Pillow RGB view -> float32 [3, size, size]."""
    from PIL import Image

    resized = np.asarray(view.resize((s.size, s.size), resample=Image.BILINEAR))
    x = (resized.astype(np.float64) * s.rescale).astype(np.float32).transpose(2, 0, 1)
    mean = np.asarray(s.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(s.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def preprocess(source, settings: ImageSettings = ImageSettings()) -> Views:
    """An image path (or Pillow image) -> the encoder's views of it."""
    image = open_image(source)
    w, h = image.size
    boxes = [(0, 0, w, h)]
    if settings.pan_and_scan:
        boxes += crop_boxes(w, h, settings)
    views = [image if b == (0, 0, w, h) else image.crop(b) for b in boxes]
    return Views(np.stack([to_pixels(v, settings) for v in views]), tuple(boxes))
