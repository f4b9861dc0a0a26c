"""Image prompts: where images go in the token sequence, their pixels, and the prefills that place
their embeddings: in one chunk on the PyTorch model (`prefill`), and view by view through an
artifact's image entry points (`session_prefill`).

The sequence is the one transformers' Gemma 3 processor builds: each image is written where the
prompt holds `<start_of_image>` (or, without one, the images come first, as Gemma 3's chat
template places an [image, text] user turn), and each is expanded to
"\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n"; with pan-and-scan crops, to "Here is
the original image {view} and here are some crops to help you see better {view} {view}...".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .gemma3.images import ImageSettings, preprocess
from .gemma3.vision import VisionConfig

PLACEHOLDER = "<start_of_image>"


@dataclass(frozen=True)
class ImagePrompt:
    ids: tuple[int, ...]  # with every view's image soft tokens in place
    pixels: np.ndarray  # float32 [views, 3, S, S], in the order the views appear
    views: tuple[int, ...]  # views per image (1 + its crops)


def _view_text(crops: int) -> str:
    view = f"\n\n{PLACEHOLDER}<end_of_image>\n\n"
    if not crops:
        return view
    return (f"Here is the original image {view} and here are some crops to help you see better "
            + " ".join([view] * crops))


def image_prompt(tokenizer, vc: VisionConfig, settings: ImageSettings, text: str, images: Sequence,
                 chat: bool = False) -> ImagePrompt:
    """The token ids and pixels of a prompt with images (paths or Pillow images)."""
    if not images:
        raise ConfigError("an image prompt needs at least one image")
    holes = text.count(PLACEHOLDER)
    if holes == 0:
        text = PLACEHOLDER * len(images) + text
    elif holes != len(images):
        raise ConfigError(f"the prompt holds {holes} {PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    views = [preprocess(image, settings) for image in images]
    parts = text.split(PLACEHOLDER)
    expanded = parts[0] + "".join(_view_text(v.crops) + rest for v, rest in zip(views, parts[1:]))
    ids = tokenizer.chat(expanded) if chat else tokenizer.encode(expanded)
    out = []
    for i, t in enumerate(ids):
        out.append(t)
        if t == vc.boi_token_id and i + 1 < len(ids) and ids[i + 1] == vc.eoi_token_id:
            out += [vc.image_token_id] * vc.tokens_per_image
    n_views = sum(1 + v.crops for v in views)
    if out.count(vc.image_token_id) != n_views * vc.tokens_per_image:
        raise ConfigError(f"the prompt text itself holds image tokens: {PLACEHOLDER} marks where an image goes")
    return ImagePrompt(tuple(out), np.concatenate([v.pixels for v in views]), tuple(1 + v.crops for v in views))


def prefill(model, vision, prompt: ImagePrompt):
    """Run the whole prompt through the PyTorch model in one chunk with the image embeddings placed
    and the views' tokens attending to each other: (last logits [V], caches)."""
    import torch

    from .gemma3.vision import image_groups, place

    c = vision.cfg
    if tuple(prompt.pixels.shape[2:]) != (c.image_size, c.image_size):
        raise ConfigError(f"the pixels are {prompt.pixels.shape[2]}x{prompt.pixels.shape[3]}, the encoder takes "
                          f"{c.image_size}x{c.image_size}")
    if len(prompt.ids) > model.max_context:
        raise ConfigError(f"the image prompt's {len(prompt.ids)} tokens exceed the context {model.max_context}")
    ids = torch.tensor(prompt.ids)
    n = torch.tensor([len(prompt.ids)])
    with torch.no_grad():
        x = model.embed(torch.where(ids == c.image_token_id, 0, ids)[None])
        x = place(x, ids, vision(torch.from_numpy(prompt.pixels)), c.image_token_id)
        logits, cache = model.decode(x, torch.tensor([0]), n, model.new_cache(), all_logits=False,
                                     groups=image_groups(ids, c.image_token_id))
    return logits[0, -1].float().numpy(), cache


def session_prefill(session, vc: VisionConfig, prompt: ImagePrompt, bidirectional: bool = True) -> np.ndarray:
    """Run an image prompt through a session with image entry points, as a runtime would: text in
    prefill chunks, each view encoded (`encode_image`) and run as one chunk whose tokens see each
    other (`prefill_image`; causally with `bidirectional=False`, as a runner that knows no image
    views runs them). Returns the last position's logits [V]."""
    ids, n, size = prompt.ids, len(prompt.ids), vc.image_size
    if tuple(prompt.pixels.shape[1:]) != (3, size, size):
        raise ConfigError(f"the pixels are {prompt.pixels.shape[2]}x{prompt.pixels.shape[3]}, the encoder takes "
                          f"{size}x{size}")
    session.reset()
    i, view, logits = 0, 0, None
    while i < n:
        if ids[i] == vc.image_token_id:
            embeds = session.encode_image(prompt.pixels[view:view + 1])
            logits = session.prefill_image(embeds.reshape(-1, embeds.shape[-1]), i, bidirectional)
            i, view = i + vc.tokens_per_image, view + 1
            continue
        j = i
        while j < n and ids[j] != vc.image_token_id and j - i < session.info.prefill_len:
            j += 1
        logits = session.prefill_last(ids[i:j], i)[None]
        i = j
    return logits[-1]
