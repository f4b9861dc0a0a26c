"""The qnn target on the tiny model: both graphs compiled whole for the HTP, the recipe's codes in
the QDQ graphs, and on the emulated HTP the compiled graphs against the same QDQ graphs on the CPU
(what the compiler changed) and against PyTorch (what the recipe changed)."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gemma_export import pipeline
from gemma_export.artifact import read_manifest
from gemma_export.backends import get, qnn
from gemma_export.errors import ExportError, UnsupportedError
from gemma_export.quant.quantize import quantized_state
from gemma_export.session import TorchSession
from gemma_export.trace import DECODE, PREFILL
from gemma_export.verification.parity import teacher_forced_many
from helpers import CTX, T, TINY, cli, plant, random_ids

A16W8 = ("qnn", "a16w8")


def test_a16w8_compiles_every_node_of_both_graphs_for_the_htp(artifacts):
    out = artifacts.get(*A16W8, debug=False)
    m = read_manifest(out)
    assert m.format == "qnn" and m.recipe_name == "a16w8" and m.job["socs"] == ["SM8650"]
    assert m.program["precision"] == "a16w8" and m.program["calibration"]["activation_bits"] == 16
    assert m.program["calibration"]["tokens"] == [CTX] * 8  # sequences of the whole (tiny) context
    compiled = m.program["compile"]["socs"]["SM8650"]
    for entry in (PREFILL, DECODE):
        report = compiled[entry]
        assert report["nodes_on_npu"] == report["nodes"] > 100
        assert (out / report["binary"]).stat().st_size == report["binary_bytes"] > 0
        ctx = onnx.load(str(out / report["file"]))
        assert [n.op_type for n in ctx.graph.node] == ["EPContext"]
        # RoPE looked up, not computed: an angle's static range would stop at the calibrated positions
        ops = {n.op_type for n in onnx.load(str(out / m.program["graphs"][entry]), load_external_data=False).graph.node}
        assert not ops & {"Cos", "Sin"}, ops
    # static shapes: a full prefill chunk and one decode token; caches in and out at window / context
    io = {e: {i["name"]: i["shape"] for i in m.entry_points[e]["inputs"]} for e in (PREFILL, DECODE)}
    assert io[PREFILL]["tokens"] == [1, T] and io[DECODE]["tokens"] == [1, 1] and "length" not in io[DECODE]
    assert io[DECODE]["k_cache_0"][2] == 16 and io[DECODE]["k_cache_1"][2] == CTX


def test_the_qdq_graphs_hold_the_pytorch_codes(artifacts, quantized_tiny):
    out = artifacts.get(*A16W8, debug=False)
    stored = get("qnn").read_codes(out, read_manifest(out))
    ours = {n: q.numpy() for n, (q, _, _) in quantized_state(quantized_tiny("a16w8")).items()}
    assert len(ours) == 15
    for name, q in ours.items():
        assert any(np.array_equal(s, q) or np.array_equal(s, q.T) for s in stored), name


def test_a16w4_stores_int4_codes_and_the_htp_computes_what_its_qdq_graph_does(artifacts, quantized_tiny):
    """int4 weights per channel (the table int8): packed INT4 initializers in the QDQ graphs holding
    the PyTorch recipe's codes, compiled whole."""
    out = artifacts.get("qnn", "a16w4", debug=False)
    m = read_manifest(out)
    assert m.program["precision"] == "a16w4"
    assert all(r["nodes_on_npu"] == r["nodes"] for r in m.program["compile"]["socs"]["SM8650"].values())
    graph = onnx.load(str(out / m.program["graphs"][PREFILL]), load_external_data=False).graph
    assert TensorProto.INT4 in {i.data_type for i in graph.initializer}  # packed two codes per byte
    stored = get("qnn").read_codes(out, m)
    state = quantized_state(quantized_tiny("a16w4"))
    for name, (q, _, scheme) in state.items():
        q = q.numpy()
        assert scheme.bits == (8 if name == "embed_tokens" else 4), name
        assert any(np.array_equal(s, q) or np.array_equal(s, q.T) for s in stored), name
    assert max(int(np.abs(q.numpy()).max()) for n, (q, _, _) in state.items() if n != "embed_tokens") <= 8
    # the HTP against this graph on the CPU: in the verify test below, which runs this artifact


def test_the_emulated_htp_computes_what_the_qdq_graph_does(artifacts, quantized_tiny):
    out = artifacts.get(*A16W8, debug=False)
    m = read_manifest(out)
    sessions = {"torch": TorchSession(quantized_tiny("a16w8"), prefill_len=T),
                "simulated": qnn.QnnSession(out, m, simulated=True), "htp": qnn.QnnSession(out, m)}
    # prefill chunks, partial chunks and decode steps, past the window of 16
    got = teacher_forced_many(sessions, [("simulated", "htp"), ("torch", "htp")], random_ids(48, seed=2),
                              [T, 1, 1, 5])
    compiler, recipe = got[("simulated", "htp")].summary(), got[("torch", "htp")].summary()
    # the compiler changes fp16-rounding amounts; quantizing every activation (PyTorch quantizes
    # only each linear's input) changes more (measured: KL 7e-6 and 3e-4, min cosine 0.9992 and 0.80)
    assert compiler["mean_kl"] < 1e-4 and compiler["min_cosine"] > 0.99, compiler
    assert recipe["mean_kl"] < 5e-3 and recipe["mean_kl"] > compiler["mean_kl"], recipe


def test_a_node_the_htp_cannot_take_is_named(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    nodes = [helper.make_node("Erf", ["x"], ["e"], name="the_erf"), helper.make_node("Relu", ["e"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [x], [y])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ExportError, match="does not compile whole for SM8650: 1 nodes would fall back to the CPU: Erf the_erf$"):
        qnn._compile(path, tmp_path, qnn.soc("SM8650"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]  # nothing half-written


def test_an_unknown_soc_is_refused_before_any_work(tmp_path):
    job = pipeline.ExportJob.single(TINY, "qnn", tmp_path / "out", recipe="a16w8", socs=("SM9999",))
    with pytest.raises(UnsupportedError, match="unknown SoC 'SM9999'; the qnn target compiles for SM8550"):
        pipeline.check(job)
    with pytest.raises(UnsupportedError, match="format qnn does not support recipe 'int8'"):
        pipeline.check(replace(job, recipe="int8", socs=("SM8650",)))
    with pytest.raises(UnsupportedError, match=r"recipe 'fp32': cannot lower fp32 arithmetic \(this format computes floats in fp16\)"):
        pipeline.check(replace(job, recipe="fp32", socs=("SM8650",)))
    assert not (tmp_path / "out").exists()


def test_verify_reports_the_htp_against_the_recipe_without_the_compiler(artifacts, tmp_path):
    import json

    out = artifacts.get("qnn", "a16w4", debug=False)  # a16w8's HTP against its QDQ graph: the test above
    # judged by KL with a loose top-1 bound, and no greedy run: the tiny model's near-flat logits
    # tie, and any rounding change flips its first token
    result = cli("verify", out, "--positions", 24, "--min-top1", 0.3, "--new-tokens", 0, "--json",
                 "--report", tmp_path / "report", "--locate")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    sim = report["against_simulated"]
    assert sim["positions"] == 24 and sim["mean_kl"] < 1e-4 and sim["min_cosine"] > 0.99, sim
    # --locate: the residual stream per layer, on the HTP against the reference and against the QDQ graph
    layers = ["embedding", *(f"layer {i}" for i in range(read_manifest(out).num_layers))]
    assert list(report["locate"]["relative_error"]) == layers
    assert max(report["locate_against_simulated"]["relative_error"].values()) < 0.05, report["locate_against_simulated"]  # measured 0.022
    # the compile report travels with the verdict: per SoC and graph, what ran on the NPU
    assert report["compile"]["precision"] == "a16w4"
    prefill = report["compile"]["socs"]["SM8650"][PREFILL]
    assert prefill["nodes_on_npu"] == prefill["nodes"] and prefill["process_peak_rss_mib"] > 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Against the recipe without the compiler" in md and "## Compiled for the NPU" in md
    assert "| after | relative error vs reference | vs the recipe without the compiler |" in md
    assert f"| SM8650 | {PREFILL} | {prefill['nodes']:,} | {prefill['nodes']:,} |" in md


def _one_chunk(session, ids, shapes):
    feed = {"tokens": np.array([ids], np.int32), "pos": np.zeros(1, np.int32), "length": np.array([len(ids)], np.int32),
            **{n: np.zeros(s, np.float32) for n, s in shapes.items()}}
    return session.run(["logits"], feed)[0][0]


def test_fp16_graphs_carry_a_residual_stream_past_fp16s_range(tiny, tmp_path):
    """The real 270M's residual stream reaches ~1e5, past fp16's 65504: the tiny model made so (its
    table scaled up, the head untied) computes in fp16 on the HTP what its graph does on the CPU.
    (Traced in the a16w8 forms instead, the same graph is wrong on the HTP even unscaled: max
    difference 0.82 against logits of at most 0.81.)"""
    import copy

    import torch

    from gemma_export.trace import cache_names

    model = copy.deepcopy(tiny)
    qnn._untie(model)
    model.embed_tokens.weight.data *= 2e5
    ids = random_ids(T, seed=4)
    with torch.no_grad():
        _, _, states = model.step(torch.tensor([ids], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                                  torch.tensor([T], dtype=torch.int32), model.new_cache(), hidden=True)
    assert states.abs().max() > 65504  # past fp16's range (like the real 270M's, ~1e5)
    path = tmp_path / "prefill.onnx"
    io = qnn._trace(model, T, False, path, fp16=True)
    shapes = {i["name"]: i["shape"] for i in io["inputs"] if i["name"] in cache_names(model.cfg.num_layers)}
    cpu = _one_chunk(qnn.cpu_session(path), ids, shapes)
    htp = _one_chunk(qnn.htp_session(path, qnn.soc("SM8650")), ids, shapes)
    assert np.isfinite(htp).all() and np.abs(htp - cpu).max() < 0.01 * np.abs(cpu).max(), np.abs(htp - cpu).max()


def test_fp16_exports_a_float_graph_the_htp_runs_and_verify_judges(artifacts):
    import json

    out = artifacts.get("qnn", "fp16", debug=False)
    m = read_manifest(out)
    assert m.program["precision"] == "fp16" and m.program["calibration"] is None
    assert all(r["nodes_on_npu"] == r["nodes"] for r in m.program["compile"]["socs"]["SM8650"].values())
    result = cli("verify", out, "--positions", 24, "--new-tokens", 4, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # against PyTorch in fp32 by the fp16 recipe's limits; the simulated graph is the same float graph on the CPU
    assert report["pass"] and report["mean_kl"] < 1e-4, report  # measured 2.6e-7
    assert report["against_simulated"]["mean_kl"] < 1e-4


def test_locate_finds_a_planted_fault_on_the_htp(artifacts, tiny, tmp_path):
    """The residual stream read from the compiled prefill graph, in order and with the fp16 graph's
    scale undone (else every state would be off by 1 - 1/64): one layer's weights scaled, the
    embedding and the layer before it still agree with PyTorch on the HTP, that layer does not."""
    from gemma_export.runtime import open_artifact
    from gemma_export.verification.parity import locate

    bad = artifacts.copy("qnn", tmp_path / "faulty", "fp16", debug=False)
    plant(bad, tiny.layers[1].mlp.down_proj.weight.detach().numpy(), files=["prefill.onnx.data"])
    found = locate(TorchSession(tiny, prefill_len=T), open_artifact(bad, hashes=True).session, random_ids(T, seed=5))
    assert found["first_diverging"] == "layer 1", found


def test_a_graph_without_the_exporters_name_scopes_cannot_be_located():
    from gemma_export.errors import ArtifactError

    add = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph([add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ArtifactError, match="residual adds"):
        qnn.stream_tensors(graph)


def test_decode_steps_are_calibrated_early_and_late_in_each_sequence():
    assert qnn._decode_positions(1024, 128) == [*range(128, 136), *range(1016, 1024)]
    assert qnn._decode_positions(140, 128) == [*range(128, 140)]  # short: the two halves meet
    assert qnn._decode_positions(100, 128) == []  # one prefill chunk holds it all
