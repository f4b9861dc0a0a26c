"""Artifacts run by each runtime's own LLM API, as shipped: the greedy text of PyTorch, the stop at
<end_of_turn> from the runtime's own metadata, and (slow) the real 270M past the window."""

import copy

import pytest
import torch

from gemma_export import pipeline
from gemma_export.loading import ModelSpec, Tokenizer
from gemma_export.verification.stock import chat_text, prompts, stock_parity
from helpers import CTX, TEXT, T, write_hf_folder

SLOW = pytest.mark.slow
STOCK = [pytest.param("onnx"), pytest.param("pte", marks=SLOW), pytest.param("tflite", marks=SLOW)]
# Scaling <end_of_turn>'s (tied) embedding row by this makes the tiny model answer the chat
# prompt with two tokens and then <end_of_turn>: a stop the runtime must honour from its metadata.
EOT_SCALE = -3.45


@pytest.fixture(scope="module")
def ends_its_turn(tiny, tmp_path_factory):
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.embed_tokens.weight[106] *= EOT_SCALE
    return ModelSpec(str(write_hf_folder(model, tmp_path_factory.mktemp("ends-its-turn"))), max_context=CTX)


@pytest.mark.parametrize("fmt", STOCK)
def test_the_runtime_stops_at_end_of_turn(ends_its_turn, fmt, tmp_path):
    out = tmp_path / fmt
    pipeline.export(pipeline.ExportJob.single(ends_its_turn, fmt, out, prefill_len=T, debug_outputs=False))
    tok = Tokenizer(out / "tokenizer.json")
    r = stock_parity(out, "chat", chat_text(tok), 12)
    assert r.stopped and len(r.reference) == 2, r  # the planted model does end its turn
    assert r.match, r  # and the runtime stopped there, not 10 tokens later


@pytest.fixture(scope="module")
def real_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    made = {}

    def get(fmt):
        if fmt not in made:
            made[fmt] = root / fmt
            pipeline.export(pipeline.ExportJob.single(ModelSpec("gemma3-270m"), fmt, made[fmt], prefill_len=128,
                                                      max_context=2048, debug_outputs=False))
        return made[fmt]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx"])  # pte and tflite: make bench (benchmarks.stock), minutes of export each
def test_real_270m_runtime_greedy_equals_pytorch(real_artifacts, fmt):
    """32 greedy tokens from the runtime's own API after a short prompt and after one longer than
    the 512 window, equal to the PyTorch reference's."""
    from gemma_export.artifact import read_manifest
    from gemma_export.runtime import reference_for

    out = real_artifacts(fmt)
    ref = reference_for(read_manifest(out))
    ps = prompts(ref.tokenizer, TEXT.read_text(), 512)
    for name in ("short", "long"):
        r = stock_parity(out, name, ps[name], 32, ref)
        print(fmt, name, r.prompt_tokens, repr(r.stock_text))
        assert r.match, r.to_dict()
        assert len(r.reference) == 32 and (r.prompt_tokens > 512) == (name == "long")
