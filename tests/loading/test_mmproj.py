"""llama.cpp's Gemma 3 vision file (mmproj GGUF) beside a GGUF text model: the same vision
embeddings and the same greedy tokens as the Hugging Face folder holding the same weights."""

import matplotlib
import numpy as np
import pytest
import torch
from helpers import CTX, cli, tiny_gguf, write_hf_multimodal, write_mmproj

from gemma_export import api
from gemma_export.errors import CheckpointError, ConfigError
from gemma_export.gemma3.vision import random_vision, vision_preset
from gemma_export.loading import ModelSpec
from gemma_export.loading import mmproj
from gemma_export.loading.load import load_vision, vision_from_tensors

PHOTO = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"


@pytest.fixture(scope="module")
def text_gguf(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("mmproj") / "tiny.gguf", lambda name, arr: "F32")


@pytest.fixture(scope="module")
def tower():
    return random_vision(vision_preset("tiny"), seed=1)


def _embeddings(vision, seed=0):
    pixels = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (2, 3, 56, 56)).astype(np.float32))
    with torch.no_grad():
        return vision(pixels)


@pytest.mark.parametrize("legacy", [False, True], ids=["gguf-name-map", "early-conversion-mlp-names"])
def test_the_tower_read_back_is_the_tower_written(tower, tmp_path, legacy):
    path = write_mmproj(tower, tmp_path / "mmproj.gguf", legacy_mlp_names=legacy, projection_f16=False)
    vc = mmproj.read_config(path)
    assert {k: v for k, v in vc.to_dict().items() if k != "name"} == \
        {k: v for k, v in tower.cfg.to_dict().items() if k != "name"}
    loaded = vision_from_tensors(vc, mmproj.tensors(path, vc))
    for name, p in tower.state_dict().items():
        if name == "projector.mm_soft_emb_norm.weight":  # stored as 1 + w in fp32: w comes back to an ulp of 1
            assert (loaded.state_dict()[name] - p).abs().max() <= 2**-23
        else:
            assert torch.equal(loaded.state_dict()[name], p), name
    a, b = _embeddings(loaded), _embeddings(tower)
    assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_llama_cpps_f16_projection_costs_only_its_rounding(tower, tmp_path):
    path = write_mmproj(tower, tmp_path / "mmproj.gguf")  # the converter stores mm.input_projection in F16
    vc = mmproj.read_config(path)
    a, b = _embeddings(vision_from_tensors(vc, mmproj.tensors(path, vc))), _embeddings(tower)
    assert 0 < (a - b).abs().max() <= 1e-3 * b.abs().max()


def test_a_gguf_text_model_with_its_mmproj_generates_what_the_hf_folder_does(text_gguf, tower, tmp_path):
    from gemma_export.loading.load import load

    # the folder's text model is the GGUF's as loaded (its metadata sets the layer pattern)
    text = load(ModelSpec(str(text_gguf), max_context=CTX)).model
    folder = write_hf_multimodal(text, tmp_path / "hf", seed=1)
    path = write_mmproj(tower, tmp_path / "mmproj.gguf", projection_f16=False)
    prompt = dict(prompt="What is in <start_of_image> here?", max_new_tokens=12, chat=True, images=[PHOTO],
                  pan_and_scan=False)
    ref = api.open(str(folder), prefill_len=16).generate(**prompt)
    ours = api.open(str(text_gguf), prefill_len=16,
                    spec=ModelSpec(str(text_gguf), max_context=CTX, mmproj=str(path))).generate(**prompt)
    assert ours.prompt_tokens == ref.prompt_tokens > 16
    assert ours.tokens == ref.tokens and len(set(ref.tokens)) > 1
    res = cli("generate", text_gguf, "--mmproj", path, "--image", PHOTO, "--prompt", "Who?", "--max-new-tokens", 2,
              "--max-context", CTX, "--json")
    assert res.exit_code == 0, res.output
    res = cli("inspect", text_gguf, "--mmproj", path)
    assert res.exit_code == 0 and "vision encoder   SigLIP, 2 layers, hidden 32" in res.output, res.output
    assert f"{tower.cfg.param_count():,}" in res.output


def test_refusals_are_one_line(text_gguf, tower, tmp_path):
    other = write_mmproj(tower, tmp_path / "llava.gguf", projector_type="mlp")
    with pytest.raises(CheckpointError, match="projector 'mlp'; Gemma 3's is 'gemma3'"):
        load_vision(ModelSpec(str(text_gguf), mmproj=str(other)))
    wide = random_vision(vision_preset("gemma3-4b").__class__(**{**vision_preset("tiny").to_dict(),
                                                                 "text_hidden_size": 128}), seed=1)
    with pytest.raises(CheckpointError, match="projects into 128 dimensions, the text model .* has 64"):
        load_vision(ModelSpec(str(text_gguf), mmproj=str(write_mmproj(wide, tmp_path / "wide.gguf"))))
    good = write_mmproj(tower, tmp_path / "mmproj.gguf")
    with pytest.raises(ConfigError, match="--mmproj goes with a GGUF text model"):
        load_vision(ModelSpec("tiny", random_weights=True, mmproj=str(good)))
    res = cli("generate", text_gguf, "--image", PHOTO, "--prompt", "x", "--max-context", CTX)
    assert res.exit_code == 1 and "with --mmproj" in res.output
    assert ModelSpec("x").to_dict() == {"source": "x", "random_weights": False, "seed": 0, "max_context": None,
                                        "dtype": "float32"}
