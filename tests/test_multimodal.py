"""Image prompts: token ids and pixels equal to transformers' Gemma3Processor, greedy generation
equal to Gemma3ForConditionalGeneration.generate, and the CLI's refusals."""

import matplotlib
import numpy as np
import pytest
import torch
from helpers import cli, write_hf_multimodal
from PIL import Image

from gemma_export import api
from gemma_export.gemma3.images import ImageSettings, preprocess
from gemma_export.gemma3.vision import vision_preset
from gemma_export.loading import Tokenizer, tokenizer_for
from gemma_export.multimodal import image_prompt

PHOTO = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"


@pytest.fixture(scope="module")
def processor():
    from transformers import Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    # the bundled tokenizer lacks <image_soft_token>; transformers adds it as the 4B's tokenizer has it (id 262144)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_for("preset", None)), bos_token="<bos>",
                                  eos_token="<eos>", pad_token="<pad>",
                                  extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                        "image_token": "<image_soft_token>"})
    assert tok.image_token_id == vision_preset("gemma3-4b").image_token_id
    images = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, resample=2, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3)
    return Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=256)


@pytest.mark.parametrize("text,n,pan_and_scan", [
    ("<start_of_image>Who is this?", 1, False),
    ("Compare <start_of_image> with <start_of_image>, please.", 2, True),  # the second is very wide: 4 crops
])
def test_ids_and_pixels_equal_the_gemma3_processor(processor, text, n, pan_and_scan):
    photo = Image.open(PHOTO)
    images = [photo, photo.resize((1900, 300))][:n]
    ref = processor(text=text, images=images, do_pan_and_scan=pan_and_scan, return_tensors="np")
    ours = image_prompt(Tokenizer(tokenizer_for("preset", None)), vision_preset("gemma3-4b"),
                        ImageSettings(pan_and_scan=pan_and_scan), text, images)
    assert list(ours.ids) == ref["input_ids"][0].tolist()
    assert np.array_equal(ours.pixels, ref["pixel_values"])
    assert ours.views == ((1,) if n == 1 else (1, 5))


def test_images_go_first_without_a_placeholder():
    tok = Tokenizer(tokenizer_for("preset", None))
    vc = vision_preset("tiny")
    s = ImageSettings(size=56)
    a = image_prompt(tok, vc, s, "Describe it.", [PHOTO, PHOTO], chat=True)
    b = image_prompt(tok, vc, s, "<start_of_image><start_of_image>Describe it.", [PHOTO, PHOTO], chat=True)
    assert a.ids == b.ids and np.array_equal(a.pixels, b.pixels) and a.views == (1, 1)
    assert a.ids[:2] == (tok.bos_id, tok.start_of_turn_id)


def test_greedy_generation_equals_transformers(tiny, tmp_path):
    from transformers import Gemma3ForConditionalGeneration

    folder = write_hf_multimodal(tiny, tmp_path / "mm")
    opened = api.open(str(folder), prefill_len=16)
    out = opened.generate("What is in <start_of_image> here?", max_new_tokens=16, chat=True, images=[PHOTO],
                          pan_and_scan=False)
    tok = opened.tokenizer
    p = image_prompt(tok, vision_preset("tiny"), ImageSettings(size=56), "What is in <start_of_image> here?",
                     [PHOTO], chat=True)
    assert out.prompt_tokens == len(p.ids)
    hf = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([p.ids])
    tt = (ids == vision_preset("tiny").image_token_id).long()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=torch.from_numpy(p.pixels), token_type_ids=tt,
                          max_new_tokens=16, do_sample=False, eos_token_id=list(tok.stop_ids))
    assert out.tokens == ref[0, len(p.ids):].tolist()


def test_pan_and_scan_through_the_cli(tiny, tmp_path):
    folder = write_hf_multimodal(tiny, tmp_path / "mm")
    wide = tmp_path / "wide.png"
    Image.open(PHOTO).resize((1900, 300)).save(wide)
    assert preprocess(wide, ImageSettings(size=56, pan_and_scan=True)).crops == 4
    res = cli("generate", str(folder), "--image", str(wide), "--pan-and-scan", "--prompt", "Read it.",
              "--max-new-tokens", "3", "--json")
    assert res.exit_code == 0, res.output
    plain = cli("generate", str(folder), "--image", str(wide), "--prompt", "Read it.", "--max-new-tokens", "3",
                "--json")
    import json

    assert json.loads(res.output)["prompt_tokens"] - json.loads(plain.output)["prompt_tokens"] > 4 * 4


def test_refusals(artifacts, tmp_path):
    res = cli("generate", str(artifacts.get("onnx")), "--image", PHOTO, "--prompt", "x")
    assert res.exit_code == 1 and "has no image entry point" in res.output
    res = cli("generate", "tiny", "--random-weights", "--image", PHOTO, "--image", PHOTO, "--prompt",
              "one <start_of_image>")
    assert res.exit_code == 1 and "1 <start_of_image> placeholder(s) for 2 image(s)" in res.output
    res = cli("generate", "gemma3-1b", "--random-weights", "--max-context", "64", "--image", PHOTO, "--prompt", "x")
    assert res.exit_code == 1 and "gemma3-1b is a text-only model" in res.output
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a picture")
    res = cli("generate", "tiny", "--random-weights", "--image", str(bad), "--prompt", "x")
    assert res.exit_code == 1 and "cannot be read" in res.output
