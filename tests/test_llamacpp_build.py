"""The speed peer's build: llama.cpp's instruction sets follow what the CPU reports, and a build
made for another CPU is named as such instead of killing the benchmark process."""

import pytest

from benchmarks import llamacpp
from benchmarks.llamacpp_flags import build_flags, describe_cpu
from gemma_export.errors import UnsupportedError

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx fma f16c avx2\n"
AVX512 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx fma f16c avx2 avx512f avx512_vnni amx_int8\n"


def test_avx512_is_asked_for_only_where_the_cpu_has_it():
    assert "-DGGML_AVX512=OFF" in build_flags(AVX2) and "-DGGML_AVX512_VNNI=OFF" in build_flags(AVX2)
    assert "-DGGML_AVX512=ON" in build_flags(AVX512) and "-DGGML_AVX512_VNNI=ON" in build_flags(AVX512)
    for cpu in (AVX2, AVX512):  # never the native probe, never AMX (its kernel dies on these CPUs)
        flags = build_flags(cpu)
        assert "-DGGML_AVX2=ON" in flags and "-DGGML_NATIVE=OFF" in flags and "-DGGML_AMX_INT8=OFF" in flags


def test_a_build_for_another_cpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(llamacpp, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    llamacpp._check_build.cache_clear()
    try:
        with pytest.raises(UnsupportedError, match="built for another CPU.*CMAKE_ARGS"):
            llamacpp._check_build()
    finally:
        llamacpp._check_build.cache_clear()


def test_results_name_the_cpu_and_its_instruction_sets():
    assert describe_cpu(AVX2) == {"cpu": "AMD EPYC", "isa": ["avx2", "f16c", "fma"]}
    assert "avx512f" in describe_cpu(AVX512)["isa"]
