"""The CMake flags llama-cpp-python is built with for this machine's CPU (`make bench` reads them).

llama.cpp's native build dies in its AMX kernel on some of the CPUs these benchmarks run on, so
the instruction sets are named instead; and they are named from /proc/cpuinfo, because a build
with AVX-512 stops with an illegal instruction on the CPUs without it. Standard library only: the
Makefile runs this before anything is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

# GGML option -> the cpuinfo flag the CPU must report for it
OPTIONS = {"GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
           "GGML_AVX512": "avx512f", "GGML_AVX512_VNNI": "avx512_vnni"}


def cpu_flags(cpuinfo: str) -> set[str]:
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""


def describe_cpu(cpuinfo: str | None = None) -> dict:
    """The CPU a benchmark ran on, for its results: these machines are not always the same host,
    and the instruction sets change which kernels every runtime (ours and llama.cpp) runs."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    name = next((ln.partition(":")[2].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "")
    return {"cpu": name, "isa": sorted(set(OPTIONS.values()) & cpu_flags(cpuinfo))}


def build_flags(cpuinfo: str | None = None) -> str:
    have = cpu_flags(_cpuinfo() if cpuinfo is None else cpuinfo)
    named = [f"-D{opt}={'ON' if flag in have else 'OFF'}" for opt, flag in OPTIONS.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *named, "-DGGML_AMX_INT8=OFF"])


if __name__ == "__main__":
    sys.stdout.write(build_flags() + "\n")
