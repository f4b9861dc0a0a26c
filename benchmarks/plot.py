"""The speed benchmarks as one figure: our artifacts beside llama.cpp (benchmarks.run --only
speed) and decode speed against position (benchmarks.context), from the JSON in
benchmarks/results/.

Usage: python -m benchmarks.plot [--out benchmarks/results/speed-270m.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

from benchmarks.run import RESULTS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)


def _side_by_side(ax, kind: str) -> None:
    labels, ours, peer = [], [], []
    for path in sorted(RESULTS.glob("speed-270m-*.json")):
        rows = json.loads(path.read_text())["results"]
        llama = [r[f"{kind}_tok_s"] for r in rows if r.get("model") == "llama.cpp"]
        if not llama:  # a run from before llama.cpp was measured beside ours
            continue
        for r in rows:
            if "vs_llamacpp" in r:
                labels.append(f"{r['recipe']}\n{r['format']}")
                ours.append(r[f"{kind}_tok_s"])
                peer.append(max(llama))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="ours")
    ax.bar([i + 0.2 for i in x], peer, 0.4, label="llama.cpp Q4_K_M, same run (faster of two)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel(f"{kind} tok/s")
    ax.set_title(f"real 270M, 2 threads: {kind}")
    ax.legend(fontsize=7)


def _context(ax) -> None:
    for path in sorted(RESULTS.glob("context-*.json")):
        for r in json.loads(path.read_text())["results"]:
            points = r.get("positions", [])
            ax.plot([p["position"] for p in points], [p["decode_tok_s"] for p in points], marker="o",
                    label=f"{r['label']} ({r['recipe']}, context {r['max_context']:,})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position")
    ax.set_ylabel("decode tok/s")
    ax.set_title("decode against position (benchmarks.context: its own run)")
    ax.legend(fontsize=7)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=RESULTS / "speed-270m.png")
    args = ap.parse_args(argv)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    _side_by_side(axes[0], "prefill")
    _side_by_side(axes[1], "decode")
    _context(axes[2])
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
