"""What an export will need of the machine, said before any work starts, and the refusal when the
machine has less.

Peak memory is modelled per stage as a fixed part (the Python runtime and the exporter's libraries)
plus multiples of the model's fp32 embedding bytes and fp32 decoder-layer bytes: the copies each
stage holds at its peak. The embedding gets its own multiple because every format handles the
table apart (gathered, tied to the head, quantized twice over) and the small models are mostly
table. The multiples are fitted to `make bench`'s measured peaks (tiny, 270M and 1B; at least one
fp32 copy of each part, the loaded model); the bench records each export's estimate next to its
measured peak, so the fit is checked on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ResourceError
from .gemma3.config import Gemma3Config

GIB = 2**30


@dataclass(frozen=True)
class Footprint:
    """Peak resident memory of one stage, in GiB: base + embedding x table GiB + layers x layer GiB."""

    base: float
    embedding: float
    layers: float

    def gib(self, cfg: Gemma3Config) -> float:
        table, layers = _fp32_gib(cfg)
        return self.base + self.embedding * table + self.layers * layers


# converting to each format, from a float or a quantized model (quantizing itself peaks lower)
CONVERT = {
    ("onnx", False): Footprint(0.79, 1.00, 1.06),
    ("onnx", True): Footprint(0.59, 4.60, 0.74),
    ("tflite", False): Footprint(1.06, 2.40, 1.00),
    ("tflite", True): Footprint(0.81, 5.71, 2.32),
    ("pte", False): Footprint(0.56, 6.29, 2.55),
    ("pte", True): Footprint(0.71, 3.79, 1.28),
    # qnn: measured on the 270M (float: the fp32 row of 842b8a6, which the fp16 recipe's rows
    # match within 5%); quantized peaks in onnxruntime's QDQ quantizer, which holds several copies
    # of the float graph (the head's own table included) at once
    ("qnn", False): Footprint(0.79, 5.37, 5.37),
    ("qnn", True): Footprint(0.59, 9.20, 9.20),
}
# a vision tower's image entry points, converted with the decoder (fp32 tower GiB multiples),
# fitted to `benchmarks.vision_export` (the 4B tower alone, one process per format; its fixed part
# is the runtime's, already in CONVERT); a format without image entry points holds the tower only
VISION = {"tflite": Footprint(1.06, 0.0, 3.6), "pte": Footprint(0.56, 0.0, 7.3), "onnx": Footprint(0.0, 0.0, 1.0),
          "qnn": Footprint(0.0, 0.0, 1.0)}

# the budgeted recipe's sensitivity pass (a Fisher buffer the size of the weights, and gradients)
SENSITIVITY = Footprint(1.46, 5.58, 4.34)


def _fp32_gib(cfg: Gemma3Config) -> tuple[float, float]:
    p = cfg.param_counts()
    return 4 * p["embedding"] / GIB, 4 * (p["total"] - p["embedding"]) / GIB


@dataclass(frozen=True)
class Estimate:
    peak_memory: int  # bytes
    disk: int  # bytes
    stage: str  # the stage that sets the peak

    def describe(self) -> str:
        return (f"estimated peak memory {self.peak_memory / GIB:.1f} GiB ({self.stage}), "
                f"disk {self.disk / GIB:.2f} GiB")


def vision_gib(vision) -> float:
    """The fp32 GiB of a vision tower (a VisionConfig)."""
    return 4 * vision.param_count() / GIB


def estimate(cfg: Gemma3Config, recipe, formats, disk: int, vision=None) -> Estimate:
    """The peak memory of exporting `cfg` with `recipe` to `formats` in one process, and `disk`
    (the artifacts' estimate, passed through). `vision`: the VisionConfig of a tower exported
    with the decoder (its image entry points), or None."""
    quantized = not recipe.is_float
    tower = vision_gib(vision) if vision is not None else 0.0
    stages = {}
    for fmt in formats:
        stages[f"converting to {fmt}"] = CONVERT[(fmt, quantized)].gib(cfg) + VISION[fmt].layers * tower
    if len(formats) > 1:
        # every target but the last converts a copy of the (quantized) model
        table, layers = _fp32_gib(cfg)
        copy = table + (layers / 4 if quantized else layers)
        stages = {k: v + copy for k, v in stages.items()}
    if recipe.mix is not None:
        stages["measuring sensitivity"] = SENSITIVITY.gib(cfg)
    stage = max(stages, key=stages.get)
    return Estimate(int(stages[stage] * GIB), disk, stage)


def available_memory() -> int | None:
    """Bytes this process may still take: the kernel's MemAvailable, capped by a cgroup limit when
    one is set (a container or CI runner). None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(est: Estimate, force: bool, available: int | None = None) -> None:
    """Refuse (unless `force`) when the machine has less memory available than the estimate."""
    available = available_memory() if available is None else available
    if force or available is None or available >= est.peak_memory:
        return
    raise ResourceError(f"this export needs about {est.peak_memory / GIB:.1f} GiB of memory at its peak "
                        f"({est.stage}), the machine has {available / GIB:.1f} GiB available; free memory, "
                        "use a smaller recipe or model, or pass --force to try anyway")


def describe_available() -> str:
    mem = available_memory()
    return "available memory unknown" if mem is None else f"{mem / GIB:.1f} GiB available"

