"""Image preprocessing against transformers' Gemma 3 image processor, on the photographs that ship
inside matplotlib (a real photo, and very wide and very tall images made from it)."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from gemma_export.gemma3.images import ImageError, ImageSettings, crop_boxes, preprocess

SAMPLES = Path(matplotlib.get_data_path()) / "sample_data"


def _photos():
    hopper = Image.open(SAMPLES / "grace_hopper.jpg").convert("RGB")
    return {
        "photo": hopper,  # 512 x 600
        "very wide": hopper.resize((1900, 300), Image.BICUBIC),
        "very tall": hopper.crop((100, 0, 400, 600)).resize((300, 1400), Image.BICUBIC),
        "with alpha": Image.open(SAMPLES / "Minduka_Present_Blue_Pack.png"),  # RGBA: composited on white
    }


@pytest.fixture(scope="module")
def processor():
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    # Gemma 3's published preprocessor settings; pan-and-scan arguments as the Gemma 3 processor passes them
    return Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, resample=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, rescale_factor=1 / 255)


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("name", ["photo", "very wide", "very tall", "with alpha"])
def test_pixels_equal_transformers(processor, name, pan_and_scan):
    image = _photos()[name]
    s = ImageSettings()
    ref = processor(images=[image], do_pan_and_scan=pan_and_scan, pan_and_scan_min_crop_size=s.min_crop,
                    pan_and_scan_max_num_crops=s.max_crops, pan_and_scan_min_ratio_to_activate=s.min_ratio,
                    return_tensors="np")
    ours = preprocess(image, s.replace(pan_and_scan=pan_and_scan))
    assert ours.pixels.dtype == np.float32
    assert ours.pixels.shape == ref["pixel_values"].shape
    assert ours.crops == int(ref["num_crops"][0])
    assert np.array_equal(ours.pixels, ref["pixel_values"])
    if pan_and_scan and name.startswith("very"):
        assert ours.crops >= 2


@pytest.mark.parametrize("name", ["photo", "very wide", "very tall"])
def test_crop_boxes_equal_transformers(processor, name):
    image = _photos()[name]
    arr = np.asarray(image).transpose(2, 0, 1)
    s = ImageSettings()
    ref = processor.pan_and_scan(arr, s.min_crop, s.max_crops, s.min_ratio)
    boxes = crop_boxes(*image.size, s)
    assert len(boxes) == len(ref)
    for (left, top, right, bottom), crop in zip(boxes, ref):
        assert np.array_equal(arr[:, top:bottom, left:right], crop)
    if name == "very wide":
        assert boxes == [(0, 0, 475, 300), (475, 0, 950, 300), (950, 0, 1425, 300), (1425, 0, 1900, 300)]


def test_crop_rules():
    s = ImageSettings()
    assert crop_boxes(1000, 900, s) == []  # not elongated enough
    assert crop_boxes(600, 200, s) == []  # crops would be narrower than min_crop
    assert len(crop_boxes(5000, 300, s)) == 4  # at most max_crops
    assert crop_boxes(300, 700, s) == [(0, 0, 300, 350), (0, 350, 300, 700)]


def test_bad_images_are_refused(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        preprocess(tmp_path / "missing.png")
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    with pytest.raises(ImageError, match="cannot be read"):
        preprocess(bad)
