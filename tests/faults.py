"""Plant a fault in an exported artifact's weights (for testing `verify --locate`).

Finds the raw fp32 bytes of one weight matrix in the model file (as stored, or transposed) and
scales that matrix in place, then re-signs the manifest: the result is an artifact that loads and
runs but computes one layer wrong, like a faulty port.
"""

from pathlib import Path

import numpy as np

from gemma_export.package import read_manifest, write_manifest


def plant(artifact: Path, weight: np.ndarray, factor: float = 3.0) -> str:
    m = read_manifest(artifact)
    files = [artifact / m["program"]["file"]]
    if m["program"].get("external_data"):
        files.append(artifact / m["program"]["external_data"])
    for layout, arr in (("as stored", weight), ("transposed", weight.T)):
        needle = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        for path in files:
            data = bytearray(path.read_bytes())
            at = data.find(needle)
            if at >= 0:
                data[at:at + len(needle)] = (np.frombuffer(needle, np.float32) * factor).tobytes()
                path.write_bytes(bytes(data))
                manifest = {k: v for k, v in m.items() if k not in ("files", "created", "manifest_version")}
                write_manifest(artifact, manifest)
                return f"{path.name} ({layout})"
    raise AssertionError("weight bytes not found in the artifact")
