"""The README's recipe x format table, from the JSON that `make bench` wrote.

Usage: python -m benchmarks.table   (prints Markdown; missing measurements show as "-")
"""

from __future__ import annotations

import json

from benchmarks.run import RESULTS


def _rows(kind: str) -> dict:
    out = {}
    for path in sorted(RESULTS.glob(f"{kind}-*.json")):
        for r in json.loads(path.read_text()).get("results", []):
            if r.get("format") == "machine" or r.get("model") == "llama.cpp":  # speed: the run's context rows
                continue
            model = "270m" if kind != "export" else r.get("model", "270m")  # eval/speed: 270M only
            out[(model, r["format"], r["recipe"])] = r
    return out


def table(model: str = "270m") -> str:
    exports, evals, speeds = _rows("export"), _rows("eval"), _rows("speed")
    keys = sorted({k for k in (*exports, *evals, *speeds) if k[0] == model}, key=lambda k: (k[2], k[1]))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| recipe | format | model file MiB | perplexity | change | mean KL | top-1 | prefill tok/s | decode tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in keys:
        e, v, s = exports.get(key, {}), evals.get(key, {}), speeds.get(key, {})
        if "unsupported" in e:
            lines.append(f"| {key[2]} | {key[1]} | not supported: {e['unsupported']} |||||||")
            continue
        change, top1 = v.get("perplexity_change"), v.get("top1_agreement")
        lines.append(
            f"| {key[2]} | {key[1]} | {fmt(e.get('model_file_mib'), '.1f')} | {fmt(v.get('perplexity'), '.2f')} | "
            f"{'-' if change is None else f'{100 * change:+.1f}%'} | {fmt(v.get('mean_kl'), '.2g')} | "
            f"{'-' if top1 is None else f'{100 * top1:.1f}%'} | "
            f"{fmt(s.get('prefill_tok_s'), '.0f')} | {fmt(s.get('decode_tok_s'), '.1f')} |")
    return "\n".join(lines)


def side_by_side() -> str:
    """Each speed run's rows against llama.cpp measured in the same run (before and after ours)."""
    lines = ["| recipe | format | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp | "
             "weight bytes / token | bandwidth used |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in sorted(RESULTS.glob("speed-*.json")):
        rows = json.loads(path.read_text()).get("results", [])
        machine = next((r for r in rows if r.get("format") == "machine"), None)
        if machine is None:  # a run from before llama.cpp was measured beside ours
            continue
        for r in rows[1:]:
            vs = r.get("vs_llamacpp", {})
            lines.append(f"| {r['recipe']} | {r['format']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                         f"{vs.get('prefill', '-')} | {vs.get('decode', '-')} | "
                         f"{r['weight_bytes_read_per_token'] / 2**20:.0f} MiB | {100 * r['bandwidth_fraction']:.0f}% |")
        lines.append(f"| | machine | read bandwidth {machine['read_bandwidth_gbs']} GB/s, {machine['threads']} threads "
                     f"({path.name}) ||||||")
    return "\n".join(lines)


def sizes(model: str = "1b") -> str:
    from gemma_export.gemma3.config import PRESETS

    cfg = PRESETS[f"gemma3-{model}"]
    params = cfg.param_counts()["total"]
    lines = ["| recipe | format | model file MiB | bytes / parameter |", "|---|---|---:|---:|"]
    for (m, f, r), e in sorted(_rows("export").items()):
        if m != model or "model_file_mib" not in e:
            continue
        per = f"{e['model_file_mib'] * 2**20 / params:.3f}"
        lines.append(f"| {r} | {f} | {e['model_file_mib']:.1f} | {per} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("Real 270M:\n")
    print(table("270m"))
    print("\nSide by side with llama.cpp (real 270M):\n")
    print(side_by_side())
    print("\n1B (random weights, sizes):\n")
    print(sizes("1b"))
