"""How well int4-mixed's sensitivity estimate predicts what rounding one tensor costs, on the real 270M.

For a spread of tensors (the most and least sensitive by the estimate, and some between), the
tensor alone is rounded to int4 block 32 (nearest) and the mean KL against the float model is
measured on the calibration samples the estimate used and on held-out text it never saw.

Usage: python -m benchmarks.mixed [--tensors 10] [--samples 16]
Writes benchmarks/results/mixed-270m-sensitivity.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from gemma_export.api import DEFAULT_TEXT
from gemma_export.loading import ModelSpec, Tokenizer, load
from gemma_export.quant import mixed
from gemma_export.quant.algorithms import dequantize, quantize_with, rtn_scales
from gemma_export.quant.calibrate import calibration_set
from gemma_export.quant.recipes import PRESETS

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def log_probs(model, samples):
    return [model.step(torch.tensor([ids]), torch.tensor([0]), torch.tensor([len(ids)]),
                       model.new_cache())[0][0].log_softmax(-1) for ids in samples]


def mean_kl(ref, got):
    kls = [(r.exp() * (r - g)).sum(-1) for r, g in zip(ref, got)]
    return float(torch.cat(kls).mean())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=10)
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args(argv)
    recipe = PRESETS["int4-mixed"]
    loaded = load(ModelSpec("gemma3-270m", max_context=2048))
    model, tok = loaded.model, Tokenizer(loaded.tokenizer_path)
    calib, _ = calibration_set(recipe, tok, model.max_context)
    calib = calib[:args.samples]
    text = tok.encode(Path(DEFAULT_TEXT).read_text(), bos=False)
    # shaped like the calibration samples: <bos> and 255 tokens of text
    held = [[tok.bos_id, *text[i:i + 255]] for i in range(0, 4 * 255, 255)]
    names = [n for n in mixed._weights(model)]
    t0 = time.perf_counter()
    est = {n: v[0] for n, v in mixed.losses(model, calib, {n: (recipe.scheme_for(n),) for n in names}).items()}
    fisher_s = time.perf_counter() - t0
    order = sorted(names, key=est.get)
    picks = [order[int(round(i))] for i in np.linspace(0, len(order) - 1, args.tensors)]
    ref_c, ref_h = log_probs(model, calib), log_probs(model, held)
    rows = []
    for n in picks:
        m = copy.deepcopy(model)
        w = mixed._weights(m)[n]
        s = rtn_scales(w.detach(), 4, 32)
        with torch.no_grad():
            w.copy_(dequantize(quantize_with(w.detach(), s, 4), s))
        row = {"tensor": n, "estimate": est[n], "kl_calibration": mean_kl(ref_c, log_probs(m, calib)),
               "kl_held_out": mean_kl(ref_h, log_probs(m, held))}
        print(row, flush=True)
        rows.append(row)
        del m
    doc = {"benchmark": "mixed-270m-sensitivity", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "samples": len(calib), "tokens_per_sample": len(calib[0]), "held_out_tokens": sum(map(len, held)),
           "fisher_seconds": round(fisher_s, 1),
           "spearman_calibration": float(spearmanr([r["estimate"] for r in rows], [r["kl_calibration"] for r in rows])[0]),
           "spearman_held_out": float(spearmanr([r["estimate"] for r in rows], [r["kl_held_out"] for r in rows])[0]),
           "results": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixed-270m-sensitivity.json").write_text(json.dumps(doc, indent=2))
    print({k: v for k, v in doc.items() if k != "results"})


if __name__ == "__main__":
    main()
