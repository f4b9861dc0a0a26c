"""Where quantization loses quality on the real 270M: one recipe variant at a time, in PyTorch.

Each variant quantizes a copy of the fp32 model and is compared with it over the held-out eval
text (teacher-forced, the same chunking as `verify`): perplexity, mean KL, top-1 agreement.

Usage: python -m benchmarks.ablation [--suite int8|int4] [--positions 1024] [VARIANT ...]   (default: all)
Writes (merges by variant into) benchmarks/results/ablation-SUITE.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

from gemma_export.quant.recipes import PRESETS, QuantRecipe, Rule, Scheme

E, L = "embed_tokens", "layers.*"
W8, D8 = Scheme(8), Scheme(8, activations="int8-dynamic")
B8 = Scheme(8, "block", 32)
INT8 = {
    "embedding-only": (Rule(E, W8),),
    "linears-only": (Rule(L, W8),),
    "linears-only-dynamic": (Rule(L, D8),),
    "int8-weights": PRESETS["int8-weights"].rules,
    "int8-unsmoothed": PRESETS["int8"].rules,
    "int8": PRESETS["int8"],
    "block32-weights": (Rule(E, B8), Rule(L, B8)),
    # the bundled GGUF stores the table as Q8_0 (int8, one scale per 32): per-row int8 re-rounds it
    "embedding-block32": (Rule(E, B8),),
    "linears-gptq": (Rule(L, Scheme(8, algorithm="gptq")),),
    "down-proj-dynamic-only": (Rule("layers.*.down_proj", D8), Rule(L, W8)),
    "weights-calibrated": (Rule(E, Scheme(8, algorithm="search")), Rule(L, Scheme(8, algorithm="gptq"))),
    "int8-calibrated": (Rule(E, Scheme(8, activations="int8-dynamic", algorithm="search")),
                        Rule(L, Scheme(8, activations="int8-dynamic", algorithm="gptq"))),
    # not a recipe: every weight rounded to bf16 (how published checkpoints ship), computed in fp32;
    # the smallest perturbation any format could add, so the metric's floor on this text
    "bf16-rounding": None,
}
R4, G4 = Scheme(4, "block", 32), Scheme(4, "block", 32, algorithm="gptq")
INT4 = {
    "embedding-rtn": (Rule(E, R4),),
    "linears-rtn": (Rule(L, R4),),
    "linears-gptq": (Rule(L, G4),),
    "linears-gptq-act": (Rule(L, Scheme(4, "block", 32, algorithm="gptq-act")),),
    "weights-rtn": (Rule(E, R4), Rule(L, R4)),
    "weights-gptq": (Rule(E, R4), Rule(L, G4)),
    "embedding-gptq": (Rule(E, G4),),
    "embedding-search": (Rule(E, Scheme(4, "block", 32, algorithm="search")),),
    "weights-gptq-search-head": (Rule(E, Scheme(4, "block", 32, algorithm="search")), Rule(L, G4)),
    "weights-gptq-head": (Rule(E, G4), Rule(L, G4)),
    "int4-b32-rtn": PRESETS["int4-b32-rtn"],
    "int4-b32": PRESETS["int4-b32"],
    "int4-b128-rtn": PRESETS["int4-b128-rtn"],
    "int4-b128": PRESETS["int4-b128"],
    "int4-b32-smooth-0.25": replace(PRESETS["int4-b32"], smoothing=0.25),
    "int4-b32-smooth-0.5": replace(PRESETS["int4-b32"], smoothing=0.5),
}
SUITES = {"int8": INT8, "int4": INT4}


def main(argv=None):
    import calibration
    import torch

    from benchmarks.run import RESULTS
    from gemma_export.loading import ModelSpec, load
    from gemma_export.quant.quantize import quantize_
    from gemma_export.session import TorchSession
    from gemma_export.loading import Tokenizer
    from gemma_export.verification.parity import teacher_forced

    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=SUITES, default="int8")
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("variants", nargs="*")
    args = ap.parse_args(argv)
    variants = SUITES[args.suite]
    for name in args.variants:
        if name not in variants:
            ap.error(f"unknown variant {name!r} in suite {args.suite}: {', '.join(variants)}")
    torch.set_num_threads(2)
    loaded = load(ModelSpec("gemma3-270m"))
    tok = Tokenizer(loaded.tokenizer_path)
    ids = tok.encode(calibration.EVAL_TEXT.read_text())[:args.positions]
    ref = TorchSession(loaded.model, prefill_len=128)
    gaps = top2_gaps(ref, ids)
    print("fp32 top-1/top-2 logit gap: " + ", ".join(f"{100 * v:.1f}% of positions < {k}" for k, v in gaps.items()))
    rows = []
    for name in args.variants or list(variants):
        v = variants[name]
        model = copy.deepcopy(loaded.model)
        t0 = time.perf_counter()
        if v is None:
            recipe = QuantRecipe(name, ())
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
        else:
            recipe = v if isinstance(v, QuantRecipe) else QuantRecipe(name, v)
            c = recipe.calibration
            data = calibration.build(tok, c.samples, c.seq_len, c.seed)[0] if recipe.needs_calibration else None
            quantize_(model, recipe, data)
        s = teacher_forced(ref, TorchSession(model, prefill_len=128), ids).summary()
        row = {"variant": name, "recipe": recipe.to_dict(), "positions": len(ids),
               "perplexity": s["perplexity_test"], "perplexity_fp32": s["perplexity_reference"],
               "mean_kl": s["mean_kl"], "top1_agreement": s["top1_agreement"],
               "quantize_s": round(time.perf_counter() - t0, 1)}
        print(f"{name:<24} ppl {row['perplexity']:.3f} (fp32 {row['perplexity_fp32']:.3f})  "
              f"KL {row['mean_kl']:.4f}  top-1 {100 * row['top1_agreement']:.1f}%", flush=True)
        rows.append(row)
        del model
        _save(RESULTS / f"ablation-{args.suite}.json", args.suite, rows, gaps)


def top2_gaps(session, ids, limits=(0.01, 0.02, 0.05, 0.1)) -> dict:
    """Share of positions whose reference top-1 logit leads the runner-up by less than each limit:
    those flip under the smallest perturbation, which bounds any top-1 agreement."""
    import numpy as np

    from gemma_export.session import feed

    session.reset()
    top2 = np.concatenate([np.sort(logits, axis=-1)[:, -2:] for _, logits in feed(session, ids)])
    gap = top2[:, 1] - top2[:, 0]
    return {str(k): round(float((gap < k).mean()), 4) for k in limits}


def _save(path, suite: str, rows: list[dict], gaps: dict) -> None:
    """Merge rows into the suite's results by variant name (a partial run keeps the others)."""
    old = json.loads(path.read_text())["results"] if path.exists() else []
    new = {r["variant"] for r in rows}
    merged = [r for r in old if r["variant"] not in new] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": f"ablation-{suite}", "reference_top2_gap_below": gaps,
                                "results": merged}, indent=2))


if __name__ == "__main__":
    main()
