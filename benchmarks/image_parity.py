"""Image prompts through exported artifacts, per format x recipe, on the tiny model with its tiny
vision encoder: vision embeddings and the last logits of an image+text and a pan-and-scan prompt
against the PyTorch model with the same weights (the artifact's recipe applied in PyTorch), run
view by view as a runtime runs them, against the PyTorch prompt in one chunk.

Usage: python -m benchmarks.image_parity  -> benchmarks/results/image-parity-tiny.json
"""

import json
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from gemma_export import api, pipeline
from gemma_export.loading import ModelSpec
from gemma_export.gemma3.images import ImageSettings
from gemma_export.loading.load import load_vision
from gemma_export.multimodal import image_prompt, prefill, session_prefill
from gemma_export.runtime import open_model
from gemma_export.verification.metrics import Comparison

TINY = ModelSpec("tiny", random_weights=True, seed=0, max_context=256)
PHOTO = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    wide = tmp / "wide.png"
    Image.open(PHOTO).resize((1900, 300)).save(wide)
    vision = load_vision(TINY)
    rows = []
    for recipe in ("fp32", "int8"):
        ref = open_model(TINY, recipe, prefill_len=16)
        model, tok = ref.session.model, ref.tokenizer
        for fmt in ("onnx", "pte", "tflite"):
            out = tmp / f"{fmt}-{recipe}"
            t0 = time.time()
            pipeline.export(pipeline.ExportJob.single(TINY, fmt, out, recipe=recipe, prefill_len=16))
            secs = time.time() - t0
            s = api.open(str(out)).session
            row = {"format": fmt, "recipe": recipe, "export_s": round(secs, 1)}
            p = image_prompt(tok, vision.cfg, ImageSettings(size=56), "x", [PHOTO])
            with torch.no_grad():
                want = vision(torch.from_numpy(p.pixels))[0].numpy()
            got = s.encode_image(p.pixels).reshape(want.shape)
            row["vision_rel_max_diff"] = float(np.abs(got - want).max() / np.abs(want).max())
            for pas in (False, True):
                p = image_prompt(tok, vision.cfg, ImageSettings(size=56, pan_and_scan=pas),
                                 "Compare <start_of_image> with <start_of_image>, please.", [PHOTO, wide], chat=True)
                w, _ = prefill(model, vision, p)
                g = session_prefill(s, vision.cfg, p)
                c = Comparison()
                c.add(w[None], g[None])
                key = "pan_and_scan" if pas else "image_text"
                row[key] = {"views": sum(p.views), "tokens": len(p.ids), "top1": c.top1[0], "kl": c.kl[0],
                            "max_abs": c.max_abs[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / "image-parity-tiny.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()
