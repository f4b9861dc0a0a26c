"""ONNX specifics: the decoder's head on the last position, the score graph and the debug output
only when asked for, static activations from a recipe file."""

import numpy as np
import pytest

from gemma_export import pipeline
from gemma_export.backends import onnx as onnx_backend
from gemma_export.errors import UnsupportedError
from gemma_export.quant.modules import QLinear
from gemma_export.quant.recipes import Calibration, QuantRecipe, Rule, Scheme, Thresholds
from gemma_export.runtime import open_artifact
from gemma_export.session import TorchSession
from gemma_export.verification.judge import Rule as Judged, judge
from gemma_export.verification.parity import teacher_forced
from helpers import TINY, T, random_ids


def _graph(path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def _outputs(graph) -> dict:
    return {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}


def test_no_debug_outputs_leaves_the_score_graph_and_hidden_states_out(artifacts, tiny):
    out = artifacts.get("onnx", debug=False)
    assert not (out / onnx_backend.SCORE_FILE).exists()
    assert "hidden_states" not in _outputs(_graph(out / "model.onnx"))
    s = open_artifact(out).session
    ref = TorchSession(tiny, prefill_len=T)
    ids = random_ids(20)
    # every position's logits, from the decoder one token at a time
    assert abs(s.prefill(ids[:T], 0) - ref.prefill(ids[:T], 0)).max() < 1e-3
    with pytest.raises(UnsupportedError, match="--no-debug-outputs"):
        s.hidden_states(ids[:T])
    debug = artifacts.get("onnx")
    assert "hidden_states" not in _outputs(_graph(debug / "model.onnx"))
    assert "hidden_states" in _outputs(_graph(debug / onnx_backend.SCORE_FILE))


@pytest.mark.parametrize("recipe", ["fp32", "int8", "int4-b32-rtn"])
def test_the_decoder_runs_the_head_on_the_last_position_and_the_score_graph_on_all(artifacts, recipe):
    """genai reads a prefill's last logits only: model.onnx computes those alone, and score.onnx
    (the same weights: one external data file) gives every position's, equal at the last."""
    out = artifacts.get("onnx", recipe)
    decoder, score = _graph(out / "model.onnx"), _graph(out / onnx_backend.SCORE_FILE)
    assert _outputs(decoder)["logits"][1] == 1 and _outputs(score)["logits"][1] != 1
    files = {e.value for g in (decoder, score) for i in g.initializer for e in i.external_data if e.key == "location"}
    assert files == {onnx_backend.DATA}
    s, ids = open_artifact(out).session, random_ids(T)
    every = s.prefill(ids, 0)
    assert every.shape[0] == T
    s.reset()
    last = s.prefill_last(ids, 0)
    assert np.abs(last - every[-1]).max() < 1e-3 * max(1.0, np.abs(every[-1]).max())


def test_onnxruntime_fuses_every_norm_and_gelu_at_load(artifacts, tiny, tmp_path):
    """The graph's RMSNorm and GELU are in the forms onnxruntime's optimizer fuses: each becomes one
    kernel instead of a chain of elementwise nodes run one by one every step, and a residual Add
    before a norm is part of it. RoPE is inside GroupQueryAttention: no rotation nodes (rotate_half's
    Neg, the angles' Cos/Sin) and no head transposes are left around it."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(artifacts.get("onnx", debug=False) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)
    layers = tiny.cfg.num_layers
    norms = ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"]
    assert norms == 6 * layers + 1, ops  # 4 per block, QK-norm, the final norm
    # the residual Adds are inside the norms after them: the pre-MLP one, the next layer's input norm
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers, ops
    assert ops["FastGelu"] == layers and not ops["Tanh"] and not ops["ReduceMean"], ops
    assert ops["GroupQueryAttention"] == layers and not (ops["Neg"] or ops["Cos"] or ops["Sin"] or ops["Transpose"]), ops


@pytest.mark.slow
def test_onnx_lowers_a_static_activation_recipe_file(tmp_path, quantized_tiny, monkeypatch):
    """Static int8/int16 activations (calibrated per-tensor scales) from a recipe file, through ONNX;
    the traced float weights are released before the codes replace them (lowering reads the graph's
    weights from its file, not from memory)."""
    released = []
    release = onnx_backend.release_weights
    monkeypatch.setattr(onnx_backend, "release_weights", lambda m: (release(m), released.append(m)))
    rules = (Rule("embed_tokens", Scheme(8, activations="int16-static")),
             Rule("layers.*", Scheme(8, "block", 32, activations="int8-static")))
    path = tmp_path / "static.toml"
    # a small calibration set: the test is about lowering the calibrated scales, not their quality
    path.write_text(QuantRecipe("static-test", rules, calibration=Calibration(samples=8, seq_len=64)).to_toml())
    out = tmp_path / "art"
    pipeline.export(pipeline.ExportJob.single(TINY, "onnx", out, recipe=str(path), prefill_len=T, debug_outputs=False))
    assert len(released) == 1 and all(t.numel() == 0 for t in released[0].parameters())
    eager = quantized_tiny(str(path))
    assert all(float(m.act_scale) > 0 for m in eager.modules() if isinstance(m, QLinear))
    c = teacher_forced(TorchSession(eager, prefill_len=T), open_artifact(out).session, random_ids(60, seed=3))
    verdict = judge(Judged(False, Thresholds(min_top1=0.9, max_mean_kl=1e-5)), {"artifact": c.summary()})
    assert verdict.passed, c.summary()


@pytest.mark.slow
def test_matmuls_sharing_an_input_are_one_matmulnbits(artifacts, tiny):
    """q/k/v and gate/up read one input: each group is one MatMulNBits (its input quantized once)
    and a Split back into the projections."""
    from collections import Counter

    import onnx

    graph = onnx.load(str(artifacts.get("onnx", "int4-b32-rtn") / "model.onnx"), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    layers, cfg = tiny.cfg.num_layers, tiny.cfg
    assert ops["MatMulNBits"] == 4 * layers + 1 and ops["Split"] == 2 * layers, ops  # qkv, o, gate-up, down; head
    widths = sorted({a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "N"})
    assert cfg.q_dim + 2 * cfg.num_kv_heads * cfg.head_dim in widths and 2 * cfg.intermediate_size in widths


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["int8", "int4-b32-rtn"])
def test_the_tied_table_is_read_without_copies_onnxruntime_would_keep(artifacts, recipe):
    """onnxruntime keeps an initializer a second node reads beside the copy MatMulNBits packs at
    load. The head's fp32 scales are read as stored (no Cast or Reshape folded into another copy);
    at 8 bits the embedding gathers from its own copy of the codes (equal to the head's), so the
    head's may be released; at 4 bits the table is stored once and shared."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    graph = onnx.load(str(artifacts.get("onnx", recipe) / "model.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("model.lm_head"))
    codes, scales = head.input[1], head.input[2]
    readers = lambda name: [n.op_type for n in graph.node if name in n.input]  # noqa: E731
    assert inits[scales].data_type == TensorProto.FLOAT and len(inits[scales].dims) == 2
    assert sorted(readers(scales)) == ["Gather", "MatMulNBits"]
    if recipe == "int8":
        assert readers(codes) == ["MatMulNBits"]
        rows = next(n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0].startswith(codes))
        assert np.array_equal(numpy_helper.to_array(inits[rows]), numpy_helper.to_array(inits[codes]))
    else:
        assert sorted(readers(codes)) == ["Gather", "MatMulNBits"]
