"""Native libraries' notices held back at the file descriptor, their error lines passed on."""

import os

from gemma_export import quiet


def test_native_stdout_keeps_json_output_clean(capfd):
    print("before", flush=True)
    with quiet.native_stdout():
        os.write(1, b" # LIBNATIVE: No alternate configuration present\nERROR: the HTP library failed\n")
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out == "before\nafter\n"
    assert err == "ERROR: the HTP library failed\n"


def test_native_info_lines_pass_on_errors_only(capfd):
    with quiet.native_info_lines():
        os.write(2, b"I0000 accelerator registered\nE0000 delegate failed\n")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "E0000 delegate failed\n")


def test_executorch_cache_kernels_trace_without_deprecation_notices():
    """ExecuTorch's cache kernels call torch._check_is_size while tracing, once per attention call:
    a pte export printed torch's FutureWarning about it dozens of times."""
    import warnings

    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 (registers llama::custom_sdpa)

    class Write(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.zeros(1, 4, 2, 8))

        def forward(self, k, pos):
            start = pos.item()
            torch._check(start >= 0)
            torch._check(start < 4)
            torch.ops.llama.update_cache(k, self.cache, start)
            return self.cache + 0

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.silence()
        torch.export.export(Write(), (torch.zeros(1, 1, 2, 8), torch.tensor([1])), strict=False)
    assert not [w for w in seen if "_check_is_size" in str(w.message)]
