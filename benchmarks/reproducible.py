"""Reproducible release artifacts on real weights: the real 270M exported twice with the calibrated
int4-b32 recipe (calibration included), every file of every format compared byte for byte.

Usage: python -m benchmarks.reproducible [--formats all] [--recipe int4-b32]
Writes benchmarks/results/reproducible-270m-RECIPE.json. Part of `make bench`: two calibrated
exports of the 270M take too long for `make test` (the tiny model's formats are checked there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "out" / "bench" / "reproducible"


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="all")
    ap.add_argument("--recipe", default="int4-b32")
    args = ap.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    runs = {}
    for name in ("a", "b"):
        out = OUT / name
        cmd = [sys.executable, "-m", "gemma_export", "export", "gemma3-270m", "--format", args.formats,
               "--recipe", args.recipe, "--out", str(out), "--build-record", str(OUT / f"{name}.build.json")]
        print(" ".join(cmd[2:]), flush=True)
        t0 = time.perf_counter()
        with (OUT / f"{name}.log").open("w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=log, cwd=ROOT).returncode
        runs[name] = {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1)}
        if code:
            sys.exit(f"export {name} failed (exit {code}); see {OUT / f'{name}.log'}")
    a, b = digests(OUT / "a"), digests(OUT / "b")
    files = {name: {"sha256": a.get(name), "equal": a.get(name) == b.get(name)} for name in sorted(set(a) | set(b))}
    result = {"model": "gemma3-270m (bundled GGUF)", "recipe": args.recipe, "formats": args.formats,
              "runs": runs, "identical": a == b, "files": files}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"reproducible-270m-{args.recipe}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'identical' if a == b else 'DIFFERENT'}: {sum(f['equal'] for f in files.values())}/{len(files)} files "
          f"equal -> {path}")
    if a != b:
        sys.exit(1)


if __name__ == "__main__":
    main()
