"""ExecuTorch specifics: XNNPACK's spelling of the quantized modules, the table stored once, the
shared cache reset by its own method."""

import copy

import numpy as np
import pytest
import torch

from gemma_export.artifact import read_manifest
from gemma_export.backends.executorch import _PackedTable, _to_xnnpack_pattern, read_named_data
from gemma_export.quant.modules import QEmbedding
from gemma_export.quant.algorithms import quantize_with, rtn_scales
from gemma_export.quant.recipes import Scheme
from gemma_export.runtime import open_artifact


def test_packed_gather_reads_xnnpack_layout_and_equals_the_plain_gather():
    w = torch.randn(50, 64)
    s = rtn_scales(w, 4, 32)
    emb = QEmbedding(quantize_with(w, s, 4), s, Scheme(4, "block", 32))
    ids = torch.tensor([[0, 7, 49, 7]])
    packed = _PackedTable(emb)
    assert packed.packed_codes.dtype == torch.uint8 and packed.packed_codes.shape == (50, 32)
    assert packed.packed_scale.dtype == torch.bfloat16
    assert torch.equal(packed(ids), emb(ids))


def test_the_xnnpack_spelling_computes_the_recipe(quantized_tiny):
    """XNNPACK's modules compute what the reference modules do, up to its own activation rounding."""
    ref = quantized_tiny("int4-b32-rtn")
    xnn = copy.deepcopy(ref)
    assert _to_xnnpack_pattern(xnn) == 15  # 14 linears and the tied head
    ids = torch.tensor([list(range(100, 116))], dtype=torch.int32)
    args = (torch.zeros(1, dtype=torch.int32), torch.tensor([16], dtype=torch.int32))
    with torch.no_grad():
        a, _ = ref.step(ids, *args, ref.new_cache())
        b, _ = xnn.step(ids, *args, xnn.new_cache())
    assert torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0) > 0.999


def test_pte_session_runs_on_the_threads_asked_for(artifacts):
    from executorch.extension.pybindings import portable_lib

    for n in (1, 2, 1):
        s = open_artifact(artifacts.get("pte"), threads=n).session
        assert portable_lib._threadpool_get_thread_count() == n
        assert s.prefill([2, 900, 1000], 0).shape[0] == 3


@pytest.mark.slow
def test_pte_stores_the_table_once_and_no_cache_state(artifacts):
    """The .pte carries no zero-filled cache (its `reset` method zeroes the shared buffers), and
    the tied fp32 table is one copy in model.ptd, read by the gather and by XNNPACK's head."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    out = artifacts.get("pte")
    m = read_manifest(out)
    assert m.program["reset_method"] == "reset" and m.program["external_data"] == "model.ptd"
    pte = deserialize_pte_binary((out / "model.pte").read_bytes())
    assert not pte.mutable_data
    table = 262_144 * 64 * 4  # tiny's fp32 token table
    assert table <= (out / "model.ptd").stat().st_size < 1.05 * table


@pytest.mark.slow
def test_forward_is_few_xnnpack_partitions(artifacts):
    """XNNPACK refuses reshapes to symbolic shapes and a cat of one tensor with itself; each refusal
    ended a partition. With the token dimension written as -1 and RoPE's frequencies doubled
    before the product, tiny's forward is 7 delegated blobs (it was 19 with every RMSNorm split, 9
    with the attention's reshapes and the angles' cat; the real 270M's 178, then 58)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    out = artifacts.get("pte")
    pte = deserialize_pte_binary((out / read_manifest(out).program["file"]).read_bytes())
    plans = {p.name: p for p in getattr(pte, "program", pte).execution_plan}
    # per layer: the previous layer's output projection and MLP with this one's norms and
    # projections, then RoPE's rotation (its slices of a dynamic shape stay outside); plus the last
    # layer's tail, the last token's norm and the head
    assert 0 < len(plans["forward"].delegates) <= 2 * 2 + 3, len(plans["forward"].delegates)


@pytest.mark.slow
def test_pte_reset_zeroes_the_shared_cache(artifacts):
    s = open_artifact(artifacts.get("pte")).session
    s.prefill([2, 900, 1000], 0)
    kept = s.decode(5, 1)  # decode at position 1 reads slot 0 written by the prefill
    s.prefill([2, 900, 1000], 0)
    s.reset()
    zeroed = s.decode(5, 1)  # slot 0 now holds zeros: a different result proves reset reached the cache
    assert not np.allclose(kept, zeroed)
    s.reset()
    fresh = s.prefill([2, 900, 1000], 0)
    s.prefill([7, 7], 0)
    s.reset()
    assert np.array_equal(s.prefill([2, 900, 1000], 0), fresh)


@pytest.mark.slow
def test_quantized_pte_keeps_scales_and_the_table_once(artifacts, quantized_tiny):
    """XNNPACK's blockwise scales are blobs (bf16) equal to ours, and the int4 table in model.ptd is
    one packed copy shared by the lookup and the head."""
    out = artifacts.get("pte", "int4-b32-rtn", debug=True)
    blobs = set(read_named_data(out, read_manifest(out)).values())
    model = quantized_tiny("int4-b32-rtn")
    for mod in model.modules():
        if hasattr(mod, "scale") and hasattr(mod, "qweight"):
            assert mod.scale.to(torch.bfloat16).view(torch.uint8).numpy().tobytes() in blobs
    assert (out / "model.ptd").stat().st_size < model.embed_tokens.qweight.numel() * 0.6


@pytest.mark.slow
def test_int8_kv_caches_are_what_the_runtime_reads(tmp_path):
    """--kv-dtype int8: the global layers' caches hold int8 codes that ExecuTorch's quantized
    kernels write and read, and the PyTorch reference rounds queries, keys and values the same way,
    so the artifact is far closer to it than to fp32 caches; ExecuTorch's own LLM runner drives the
    program as it is."""
    from gemma_export import pipeline
    from gemma_export.api import DEFAULT_TEXT
    from gemma_export.verification.check import VerifyPlan, verify_artifact
    from gemma_export.verification.stock import stock_parity
    from helpers import TINY, T

    out = tmp_path / "kv-int8"
    pipeline.export(pipeline.ExportJob.single(TINY, "pte", out, prefill_len=T, debug_outputs=False, images=False,
                                              kv_dtype="int8"))
    m = read_manifest(out)
    assert (m.recipe_name, m.kv_dtype, m.job["kv_dtype"]) == ("fp32+kv-int8", "int8", "int8")
    r = verify_artifact(out, VerifyPlan(DEFAULT_TEXT, positions=96, new_tokens=8)).report  # 6 windows
    assert r["pass"] and r["judged"].startswith("against fp32"), r["failures"]
    to_recipe, to_fp32 = r["mean_kl"], r["against_fp32"]["artifact"]["mean_kl"]
    # measured: 1.2e-9 and 1.0e-7 (tiny's one global layer int8; every layer int8 gave 5.6e-10 and 1.3e-6)
    assert to_recipe < 0.05 * to_fp32, (to_recipe, to_fp32)
    s = stock_parity(out, "long", DEFAULT_TEXT.read_text()[:400], 8)
    assert s.match, s


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_the_programs_cache_kernels_compute_what_the_reference_rounds(tiny, kv):
    """forward as the program runs it (ExecuTorch's cache and attention kernels, eagerly) on fp16 or
    int8 caches on the global layer, through a prefill chunk and decode steps past the window: on
    int8 caches it agrees with the PyTorch reference rounding the same way far more closely than
    with fp32 caches; on fp16 caches it stays within fp16's precision of both (the kernel computes
    in fp16 its own way)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  the kernels as torch ops

    from gemma_export.backends.executorch import _Cache, _Forward

    ref, prog = copy.deepcopy(tiny), copy.deepcopy(tiny)
    prog.set_kv_dtype(kv)
    forward = _Forward(prog, _Cache(prog, 16))
    ids = np.random.default_rng(3).integers(3, 262_144, size=40).tolist()

    def reference(kv_dtype):
        ref.set_kv_dtype(kv_dtype)
        caches, out = ref.new_cache(), []
        for pos, chunk in [(0, ids[:16])] + [(p, [ids[p]]) for p in range(16, 40)]:
            n = torch.tensor([len(chunk)], dtype=torch.int32)
            logits, caches = ref.step(torch.tensor([chunk], dtype=torch.int32), torch.tensor([pos], dtype=torch.int32),
                                      n, caches, all_logits=False)
            out.append(logits[0, -1])
        return torch.stack(out)

    with torch.no_grad():
        got = torch.stack([forward(torch.tensor([chunk]), torch.tensor([pos]))[0, -1]
                           for pos, chunk in [(0, ids[:16])] + [(p, [ids[p]]) for p in range(16, 40)]])
        same, fp32 = reference(kv), reference("fp32")
    local, global_ = forward.cache.entries()[0], forward.cache.entries()[2]  # tiny: layer 0 local, 1 global
    assert local.dtype == torch.float32  # local rings stay fp32
    assert (global_.codes.dtype, global_.scales.dtype) == (torch.int8, torch.float32) if kv == "int8" else \
        global_.dtype == torch.float16
    to_same, to_fp32 = (got - same).abs().max().item(), (got - fp32).abs().max().item()
    if kv == "int8":  # the same per-token codes: far closer to the reference that rounds them
        assert to_same < 0.1 * to_fp32, (to_same, to_fp32)
    else:  # fp16 arithmetic of its own (measured: 3.5e-4 and 6.8e-4, logits up to 0.88)
        assert 0 < to_same < 2e-3 * fp32.abs().max() and to_fp32 < 2e-3 * fp32.abs().max(), (to_same, to_fp32, fp32.abs().max())
