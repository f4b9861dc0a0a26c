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


def build_flags(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    have = cpu_flags(cpuinfo)
    named = [f"-D{opt}={'ON' if flag in have else 'OFF'}" for opt, flag in OPTIONS.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *named, "-DGGML_AMX_INT8=OFF"])


if __name__ == "__main__":
    sys.stdout.write(build_flags() + "\n")
