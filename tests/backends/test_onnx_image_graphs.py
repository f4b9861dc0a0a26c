"""The ONNX image graphs as onnxruntime-genai runs them: the embedding graph places image features
among the text's embeddings, and the decoder takes a whole prompt with several image views in one
chunk (genai does not split at views), each view's tokens seeing each other, past the window."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import TINY

from gemma_export.backends import onnx as backend
from gemma_export.gemma3.vision import image_groups, place
from gemma_export.loading.load import load, load_vision

IMAGE = 262_144  # the tiny vision config's image token


@pytest.fixture(scope="module")
def folder(artifacts):
    return artifacts.get("onnx", images=True)


@pytest.fixture(scope="module")
def model():
    return load(TINY).model


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_genai_config_names_the_three_graphs(folder):
    cfg = json.loads((folder / backend.CONFIG).read_text())["model"]
    assert cfg["type"] == "gemma3"
    assert cfg["vision"]["filename"] == "vision.onnx" and cfg["embedding"]["filename"] == "embedding.onnx"
    assert set(cfg["decoder"]["inputs"]) >= {"inputs_embeds", "input_ids", "attention_mask"}
    assert json.loads((folder / "processor_config.json").read_text())["processor"]["transforms"]


def test_the_embedding_graph_places_image_features_as_genai_feeds_them(folder, model):
    emb = _session(folder / "embedding.onnx")
    ids = np.array([[2, 10, *[IMAGE] * 4, 11, *[IMAGE] * 4, 12]], np.int64)
    feats = np.random.default_rng(0).standard_normal((2, 4, 64)).astype(np.float32)
    with torch.no_grad():
        text = model.embed(torch.where(torch.from_numpy(ids) == IMAGE, 0, torch.from_numpy(ids)).int())
        want = place(text, torch.from_numpy(ids[0]), torch.from_numpy(feats), IMAGE).numpy()
    got = emb.run(None, {"input_ids": ids, "image_features": feats})[0]
    np.testing.assert_array_equal(got, want)
    # a text step: genai feeds [0, hidden]
    text_only = emb.run(None, {"input_ids": ids[:, :2], "image_features": np.zeros((0, 64), np.float32)})[0]
    np.testing.assert_array_equal(text_only, want[:, :2])


def test_the_decoder_runs_views_inside_any_chunk_past_the_window(folder, model):
    """Chunks as genai sends them (text and views mixed, several views in one), then decode steps,
    until far past the window of 16: logits equal the PyTorch model with the views' bidirectional
    mask (every position's from the score graph, the last one's from the decoder genai runs, each
    on its own buffers), and differ from a causal run (the mask is applied, not ignored)."""
    graphs = {"score": _session(folder / backend.SCORE_FILE), "decoder": _session(folder / "model.onnx")}
    names = backend.genai_names(model.cfg.num_layers)
    shapes = {i.name: i.shape for i in graphs["decoder"].get_inputs()}
    caches = {g: {n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shapes[n], np.float32)) for n in names} for g in graphs}
    ref_cache = model.new_cache()
    rng = np.random.default_rng(1)
    chunks = [[5] * 3 + [IMAGE] * 4 + [7] * 2 + [IMAGE] * 4 + [9], [11], [IMAGE] * 4, [3] * 20,
              [5, *[IMAGE] * 4, 6] * 3, [2], [IMAGE] * 4, [1]]
    pos, causal_gap = 0, 0.0
    for ids in chunks:
        n = len(ids)
        x = rng.standard_normal((1, n, model.cfg.hidden_size)).astype(np.float32)
        got = {}
        for g, sess in graphs.items():
            b = sess.io_binding()
            b.bind_cpu_input("inputs_embeds", x)
            b.bind_cpu_input("input_ids", np.array([ids], np.int64))
            b.bind_cpu_input("attention_mask", np.ones((1, pos + n), np.int64))
            for out in sess.get_outputs():
                b.bind_output(out.name, "cpu") if not out.name.startswith("present") else None
            for name in names:
                b.bind_ortvalue_input(name, caches[g][name])
                b.bind_ortvalue_output(backend.present_name(name), caches[g][name])
            sess.run_with_iobinding(b)
            got[g] = b.get_outputs()[0].numpy()[0]
        groups = image_groups(torch.tensor(ids), IMAGE)
        args = (torch.from_numpy(x), torch.tensor([pos]), torch.tensor([n]))
        with torch.no_grad():
            causal, _ = model.decode(*args, [c.clone() for c in ref_cache])
            want, ref_cache = model.decode(*args, ref_cache, groups=groups if (groups >= 0).any() else None)
        want, causal = want[0].numpy(), causal[0].numpy()
        assert np.abs(got["score"] - want).max() <= 1e-5 * np.abs(want).max(), (pos, n)
        assert got["decoder"].shape[0] == 1
        assert np.abs(got["decoder"] - want[-1:]).max() <= 1e-5 * np.abs(want).max(), (pos, n)
        causal_gap = max(causal_gap, float(np.abs(causal - want).max()))
        pos += n
    assert pos > 3 * model.cfg.sliding_window and causal_gap > 1e-2


@pytest.fixture(scope="module")
def genai_folder(tmp_path_factory):
    """An image artifact genai's processor can feed: genai writes 256 soft tokens per image (the
    real models' count), so the tower here is a tiny one at 224 px (16 x 16 patches, no pooling);
    the vocabulary holds the image tokens and the tokenizer knows <image_soft_token>, as the 4B's
    do (the bundled 270M tokenizer does not)."""
    import dataclasses

    from helpers import write_hf_multimodal

    from gemma_export import pipeline
    from gemma_export.gemma3.config import preset
    from gemma_export.gemma3.vision import vision_preset
    from gemma_export.loading import ModelSpec
    from gemma_export.loading.load import random_model

    root = tmp_path_factory.mktemp("genai-images")
    text = random_model(dataclasses.replace(preset("tiny"), vocab_size=262_208), seed=0, max_context=512)
    vc = dataclasses.replace(vision_preset("tiny"), name="tiny-256", image_size=224, tokens_per_image=256)
    hf = write_hf_multimodal(text, root / "hf", vision_cfg=vc)
    tok = json.loads((hf / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": IMAGE, "content": "<image_soft_token>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    out = root / "onnx"
    pipeline.export(pipeline.ExportJob.single(ModelSpec(str(hf), max_context=512), "onnx", out, prefill_len=16,
                                              debug_outputs=False))
    return out


def test_onnxruntime_genai_runs_an_image_prompt_as_our_session_does(genai_folder, tmp_path):
    """genai's own pipeline on the folder as written (its processor, vision, embedding and decoder
    graphs, the whole prompt in one decoder call) gives the greedy tokens our session gives on the
    same ids and pixels, image tokens attending both ways in both."""
    import matplotlib
    import onnxruntime_genai as og

    from gemma_export import api
    from gemma_export.session import continue_from

    photo = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
    model = og.Model(str(genai_folder))
    proc = model.create_multimodal_processor()
    inputs = proc("<bos><start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n<start_of_turn>model\n",
                  images=og.Images.open(photo))
    ids = inputs["input_ids"].as_numpy()[0].tolist()
    pixels = inputs["pixel_values"].as_numpy()
    assert ids.count(IMAGE) == 256 and pixels.shape == (1, 3, 224, 224)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=512)  # the graph's global caches are the context long
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    theirs = []
    while not gen.is_done() and len(theirs) < 8:
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))

    from gemma_export.gemma3.vision import VisionConfig
    from gemma_export.multimodal import ImagePrompt, session_prefill

    opened = api.open(str(genai_folder))
    vc = VisionConfig.from_dict(opened.manifest.images["vision"])
    session = opened.session
    logits = session_prefill(session, vc, ImagePrompt(tuple(ids), pixels, (1,)))
    ours = list(continue_from(session, logits, len(ids), len(theirs)))
    assert theirs == ours and len(ours) == 8
