"""The vision encoder, projector and image prompts against transformers'
Gemma3ForConditionalGeneration with the same random weights (saved once as safetensors)."""

import shutil

import numpy as np
import pytest
import torch
from helpers import write_hf_multimodal

from gemma_export.errors import CheckpointError, ConfigError
from gemma_export.gemma3.config import preset
from gemma_export.gemma3.images import ImageSettings, preprocess
from gemma_export.gemma3.vision import (VisionConfig, image_groups, place, random_vision, vision_preset)
from gemma_export.loading.load import ModelSpec, load, load_vision


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    """transformers' own save of a tiny multimodal model holding our random weights."""
    return write_hf_multimodal(tiny, tmp_path_factory.mktemp("hf-multimodal"))


@pytest.fixture(scope="module")
def loaded(folder):
    from transformers import Gemma3ForConditionalGeneration

    spec = ModelSpec(str(folder), max_context=256)
    hf = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return load(spec).model, load_vision(spec), hf.eval()


def _pixels(n, seed=0):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _prompt(c: VisionConfig, views: int, seed=0):
    """<bos> text, then the views as the Gemma 3 processor writes them ("\\n\\n<boi> tokens <eoi>\\n\\n"), text."""
    rng = np.random.default_rng(seed)
    ids = [2] + rng.integers(3, 255_000, 5).tolist()
    for _ in range(views):
        ids += [108, c.boi_token_id] + [c.image_token_id] * c.tokens_per_image + [c.eoi_token_id, 108]
        ids += rng.integers(3, 255_000, 2).tolist()
    return ids + rng.integers(3, 255_000, 6).tolist()


def _ours(model, vision, ids, pixels, split):
    """Prefill the first `split` tokens (holding every image) with the image embeddings placed,
    then decode the rest one token at a time."""
    c = vision.cfg
    t = torch.tensor(ids[:split])
    with torch.no_grad():
        x = place(model.embed(torch.where(t == c.image_token_id, 0, t)[None]), t, vision(pixels), c.image_token_id)
        out, cache = model.decode(x, torch.tensor([0]), torch.tensor([split]), model.new_cache(),
                                  groups=image_groups(t, c.image_token_id))
        rows = [out[0]]
        for p in range(split, len(ids)):
            lg, cache = model.step(torch.tensor([[ids[p]]]), torch.tensor([p]), torch.tensor([1]), cache)
            rows.append(lg[0])
    return torch.cat(rows)


def _kl(ref, ours):
    a, b = ref.log_softmax(-1), ours.log_softmax(-1)
    return float((a.exp() * (a - b)).sum(-1).mean())


def test_vision_embeddings_match_transformers(loaded):
    model, vision, hf = loaded
    px = _pixels(3)
    with torch.no_grad():
        ours, ref = vision(px), hf.model.get_image_features(px).pooler_output
    assert ours.shape == (3, 4, 64)
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-4


@pytest.mark.parametrize("views", [1, 3])  # 3: an image and two pan-and-scan crops
def test_image_prompt_logits_match_transformers(loaded, views):
    model, vision, hf = loaded
    c = vision.cfg
    ids = _prompt(c, views)
    px = _pixels(views, seed=views)
    split = max(i for i, t in enumerate(ids) if t == c.eoi_token_id) + 2
    tt = torch.tensor([[int(t == c.image_token_id) for t in ids]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=px, token_type_ids=tt, use_cache=False).logits[0]
    ours = _ours(model, vision, ids, px, split)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert _kl(ref, ours) <= 1e-6
    # the bidirectional mask is what makes it match: causal-only image tokens drift
    t = torch.tensor(ids[:split])
    with torch.no_grad():
        x = place(model.embed(torch.where(t == c.image_token_id, 0, t)[None]), t, vision(px), c.image_token_id)
        causal, _ = model.decode(x, torch.tensor([0]), torch.tensor([split]), model.new_cache())
    assert _kl(ref[:split], causal[0]) > 1e-5


def test_pan_and_scan_views_of_a_photograph_through_the_model(loaded):
    """Preprocessed views of a real, very wide photograph (tiny encoder size) reach the same logits."""
    import matplotlib
    from PIL import Image

    model, vision, hf = loaded
    photo = Image.open(f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg").resize((1900, 300))
    views = preprocess(photo, ImageSettings(size=56, pan_and_scan=True))
    assert views.crops == 4
    ids = _prompt(vision.cfg, 1 + views.crops, seed=7)
    px = torch.from_numpy(views.pixels)
    tt = torch.tensor([[int(t == vision.cfg.image_token_id) for t in ids]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=px, token_type_ids=tt, use_cache=False).logits[0]
    ours = _ours(model, vision, ids, px, len(ids))
    assert (ours.argmax(-1) == ref.argmax(-1)).all() and _kl(ref, ours) <= 1e-6


def test_groups_and_placement():
    c = vision_preset("tiny")
    ids = torch.tensor([2, 5, c.image_token_id, c.image_token_id, 7, c.image_token_id, 9])
    assert image_groups(ids, c.image_token_id).tolist() == [-1, -1, 0, 0, -1, 1, -1]
    with pytest.raises(ConfigError, match="3 image tokens for 4 image embeddings"):
        place(torch.zeros(1, 7, 64), ids, torch.zeros(2, 2, 64), c.image_token_id)


def test_vision_config_rules():
    assert vision_preset("gemma3-4b").param_count() == pytest.approx(417e6, rel=0.01)
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        VisionConfig(name="x", image_size=900)
    with pytest.raises(ConfigError, match="do not pool evenly"):
        VisionConfig(name="x", tokens_per_image=250)
    with pytest.raises(ConfigError, match="has no vision encoder"):
        vision_preset("gemma3-1b")
    with pytest.raises(ConfigError, match=r"takes pixels \[N, 3, 56, 56\]"):
        random_vision(vision_preset("tiny"))(torch.zeros(1, 3, 64, 64))


def test_param_count_matches_the_module():
    v = random_vision(vision_preset("tiny"))
    assert v.cfg.param_count() == sum(p.numel() for p in v.parameters())


def test_loading_refuses_a_folder_missing_vision_tensors(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    for f in bad.glob("*.safetensors"):
        state = {k: v for k, v in load_file(f).items() if "post_layernorm" not in k}
        save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="vision encoder but 2 of its tensors are missing"):
        load_vision(ModelSpec(str(bad)))


def test_text_only_models_have_no_vision(folder):
    assert load_vision(ModelSpec("gemma3-1b", random_weights=True)) is None
    assert load_vision(ModelSpec("gemma3-270m")) is None
    for name in ("gemma3-4b", "gemma3-12b", "gemma3-27b"):
        assert vision_preset(name).text_hidden_size == preset(name).hidden_size
    v = load_vision(ModelSpec(str(folder), dtype="bfloat16"))
    assert v.post_layernorm.weight.dtype == torch.bfloat16


def test_published_tensor_names_map():
    from gemma_export.gemma3.family import hf_param_name
    from gemma_export.gemma3.vision import hf_vision_param_name

    # the names in Google's published Gemma 3 multimodal safetensors, and transformers 5's in-memory names
    for key, ours in [
        ("vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight", "encoder.layers.3.mlp.fc1.weight"),
        ("model.vision_tower.vision_model.embeddings.patch_embedding.bias", "embeddings.patch_embedding.bias"),
        ("model.vision_tower.post_layernorm.weight", "post_layernorm.weight"),
        ("multi_modal_projector.mm_input_projection_weight", "projector.mm_input_projection_weight"),
        ("model.multi_modal_projector.mm_soft_emb_norm.weight", "projector.mm_soft_emb_norm.weight"),
    ]:
        assert hf_vision_param_name(key) == ours
        assert hf_param_name(key) is None  # the text decoder skips them
    assert hf_vision_param_name("language_model.model.layers.0.mlp.up_proj.weight") is None


def test_inspect_reports_the_vision_encoder(folder):
    from gemma_export import api

    assert api.inspect("gemma3-4b")["vision"]["parameters"] == vision_preset("gemma3-4b").param_count()
    assert "vision" not in api.inspect("gemma3-1b")
    r = api.inspect(str(folder))
    assert r["vision"]["config"]["num_layers"] == 2 and r["vision"]["config"]["text_hidden_size"] == 64
