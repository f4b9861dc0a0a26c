"""Image entry points of exported artifacts: the vision encoder's embeddings and an image prompt's
logits against the PyTorch model with the same weights, and greedy tokens equal."""

import matplotlib
import numpy as np
import pytest
import torch
from helpers import TINY, cli
from PIL import Image

from gemma_export import api
from gemma_export.gemma3.images import ImageSettings
from gemma_export.loading import Tokenizer
from gemma_export.loading.load import load, load_vision
from gemma_export.multimodal import image_prompt, prefill, session_prefill
from gemma_export.verification.metrics import Comparison

PHOTO = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
FORMATS = ["onnx", "pte", "tflite"]


def image_artifact(artifacts, fmt):
    """The tiny artifact with its image entry points. The pte leaves out the debug methods:
    ExecuTorch lowers every method on its own, and the text-only pte artifacts test those."""
    return artifacts.get(fmt, images=True, debug=fmt != "pte")


@pytest.fixture(scope="module")
def reference():
    loaded = load(TINY)
    return loaded.model, load_vision(TINY), Tokenizer(loaded.tokenizer_path)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "wide.png"
    Image.open(PHOTO).resize((1900, 300)).save(path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_manifest_carries_what_a_runtime_needs(artifacts, fmt):
    m = api.open(str(image_artifact(artifacts, fmt))).manifest
    assert m.images["vision"]["image_token_id"] == 262_144 and m.images["preprocessing"]["size"] == 56
    assert set(m.images["entry_points"].values()) <= set(m.entry_points)
    # the decoder that takes image views computes the head for the chunk's last position only
    decoder = m.images["entry_points"].get("text_decoder") or m.images["entry_points"]["image_view"]
    logits = next(o for o in m.entry_points[decoder]["outputs"] if o["name"] == "logits")
    assert logits["shape"] == [1, 1, m.vocab_size]


@pytest.mark.parametrize("fmt", FORMATS)
def test_vision_embeddings_equal_pytorch(artifacts, reference, fmt):
    _, vision, tok = reference
    session = api.open(str(image_artifact(artifacts, fmt))).session
    p = image_prompt(tok, vision.cfg, ImageSettings(size=56), "x", [PHOTO])
    with torch.no_grad():
        want = vision(torch.from_numpy(p.pixels))[0].numpy()
    got = session.encode_image(p.pixels).reshape(want.shape)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["image+text", "pan-and-scan"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_image_prompt_logits_equal_pytorch(artifacts, reference, wide, fmt, pan_and_scan):
    model, vision, tok = reference
    settings = ImageSettings(size=56, pan_and_scan=pan_and_scan)
    p = image_prompt(tok, vision.cfg, settings, "Compare <start_of_image> with <start_of_image>, please.",
                     [PHOTO, wide], chat=True)
    assert p.views == ((1, 5) if pan_and_scan else (1, 1))
    want, _ = prefill(model, vision, p)
    got = session_prefill(api.open(str(image_artifact(artifacts, fmt))).session, vision.cfg, p)
    c = Comparison()
    c.add(want[None], got[None])
    assert c.top1 == [1.0] and c.kl[0] <= 1e-6, (c.kl, c.max_abs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_tokens_equal_pytorch_through_the_cli(artifacts, fmt):
    args = ["--image", PHOTO, "--prompt", "What is this?", "--chat", "--max-new-tokens", "8", "--json"]
    import json

    ours = cli("generate", str(image_artifact(artifacts, fmt)), *args)
    ref = cli("generate", "tiny", "--random-weights", "--max-context", "256", "--prefill-len", "16", *args)
    assert ours.exit_code == 0 and ref.exit_code == 0, ours.output + ref.output
    assert json.loads(ours.output)["tokens"] == json.loads(ref.output)["tokens"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_judges_the_image_prompts(artifacts, fmt):
    import json

    res = cli("verify", str(image_artifact(artifacts, fmt)), "--positions", "40", "--new-tokens", "4", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    images = report["images"]
    assert images["judged"] and images["image+text"]["views"] == 1 and images["pan-and-scan"]["views"] == 5
    assert {c["label"] for c in report["checks"]} == {"artifact", "image+text", "pan-and-scan"}
    assert images["pan-and-scan"]["greedy_test"] == images["pan-and-scan"]["greedy_reference"]


def test_executorch_multimodal_runner_runs_the_pte_as_it_is(artifacts, reference):
    """ExecuTorch's stock MultimodalRunner drives vision_encoder, token_embedding and text_decoder
    itself; it knows no image views, so it equals our session running the views causally."""
    from gemma_export.artifact import read_manifest
    from gemma_export.backends.executorch import stock_multimodal
    from gemma_export.session import continue_from

    _, vision, tok = reference
    folder = image_artifact(artifacts, "pte")
    p = image_prompt(tok, vision.cfg, ImageSettings(size=56), "What is <start_of_image> this?", [PHOTO], chat=True)
    stock = stock_multimodal(folder, read_manifest(folder), p.ids, p.pixels, 8)
    session = api.open(str(folder)).session
    logits = session_prefill(session, vision.cfg, p, bidirectional=False)
    tokens = [t for t in continue_from(session, logits, len(p.ids), 8, tok.stop_ids) if t not in tok.stop_ids]
    assert stock.text == tok.decode(tokens) and len(tokens) > 0
