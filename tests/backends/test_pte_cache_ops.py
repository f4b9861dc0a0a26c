"""The pte program's attention on ExecuTorch's cache kernels, run eagerly (the kernels' PyTorch
forms): the in-place caches give the sliding-cache model's logits, past the window, for text
chunks, decode steps and image views."""

import torch
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers the llama:: ops)

from gemma_export.backends.executorch import CacheOpsAttention, cache_shapes

CHUNK = 8


def _run(model, chunks, image_views=()):
    """Feed `chunks` (lists of ids) one after another through the reference (sliding cache, groups
    mask) and through CacheOpsAttention on the program's cache layout; the chunks numbered in
    `image_views` are one image view each. Returns both logits per chunk."""
    ref_cache, ops_cache = model.new_cache(), [torch.zeros(s) for s in cache_shapes(model, CHUNK)]
    pos, out = 0, []
    for n, ids in enumerate(chunks):
        t = len(ids)
        x = model.embed(torch.tensor([ids], dtype=torch.int32))
        p, length = torch.tensor([pos], dtype=torch.int32), torch.tensor([t], dtype=torch.int32)
        image = n in image_views
        groups = torch.full((t,), 0 if image else -1, dtype=torch.int32)
        with torch.no_grad():
            ref, ref_cache = model.decode(x, p, length, ref_cache, groups=groups)
            flag = torch.tensor([1 if image else 0], dtype=torch.int32)
            kernel = CacheOpsAttention(model.cfg, p.to(torch.int64), t, image=flag)
            got, _ = model.decode(x, p, length, ops_cache, attention=kernel)
        out.append((ref, got))
        pos += t
    return out


def test_in_place_caches_equal_the_sliding_cache_past_the_window(tiny):
    w = tiny.cfg.sliding_window
    chunks = [list(range(100, 100 + CHUNK)), list(range(300, 305))] + [[400 + i] for i in range(2 * w)]
    chunks += [list(range(600, 600 + CHUNK)), [7], list(range(700, 703))]
    for ref, got in _run(tiny, chunks):
        assert torch.allclose(ref, got, atol=1e-5 * ref.abs().max()), (ref - got).abs().max()


def test_image_views_attend_both_ways_on_both_layer_kinds(tiny):
    w = tiny.cfg.sliding_window
    chunks = [list(range(100, 105)), list(range(900, 904)), [11, 12]] + [[50 + i] for i in range(w)]
    chunks += [list(range(950, 950 + CHUNK)), [3]]
    views = {1, 3 + w}
    results = _run(tiny, chunks, image_views=views)
    for ref, got in results:
        assert torch.allclose(ref, got, atol=1e-5 * ref.abs().max()), (ref - got).abs().max()
    causal = _run(tiny, chunks)  # the same chunks without views: the mask matters here
    assert not torch.allclose(causal[1][1], results[1][1], atol=1e-3)
