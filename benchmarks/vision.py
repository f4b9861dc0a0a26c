"""The image path at the full Gemma 3 4B configuration (SigLIP tower + 34-layer text decoder) against
transformers' Gemma3ForConditionalGeneration with the same random weights.

transformers builds and initialises the model; ours is assembled from the very same tensors (no
copy), so the run fits in about 18 GB instead of twice that: too large for the test suite's
workers, hence here. A real photograph is preprocessed at 896x896; the second prompt holds a wide
version of it with pan-and-scan crops.

Usage: python -m benchmarks.vision [--new-tokens 8]
Writes benchmarks/results/vision-4b-parity.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import matplotlib
import torch
from PIL import Image

from gemma_export.gemma3 import family
from gemma_export.gemma3.config import preset
from gemma_export.gemma3.images import ImageSettings
from gemma_export.gemma3.reference import hf_multimodal_config
from gemma_export.gemma3.vision import image_groups, place, vision_preset
from gemma_export.loading import Tokenizer, tokenizer_for
from gemma_export.loading.load import load_weights, vision_from_tensors
from gemma_export.multimodal import image_prompt, prefill
from gemma_export.session import TorchSession, continue_from

RESULTS = Path(__file__).parent / "results"
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def kl(ref, ours) -> float:
    a, b = ref.float().log_softmax(-1), ours.float().log_softmax(-1)
    return float((a.exp() * (a - b)).sum(-1).mean())


def main(argv=None):
    from transformers import Gemma3ForConditionalGeneration

    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--cases", default="image+text,pan-and-scan", help="comma-separated; others keep their rows")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    text_cfg, vc = preset("gemma3-4b"), vision_preset("gemma3-4b")
    t0 = time.perf_counter()
    hf = Gemma3ForConditionalGeneration(hf_multimodal_config(text_cfg, vc)).float().eval()
    # transformers initialises Gemma norm weights and the image projection to zero: give them a
    # spread, or every image embedding would be zero and the vision tower untested
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") and "vision_tower" not in name:
                p.normal_(0.0, 0.1)
            elif name.endswith("mm_input_projection_weight"):
                p.normal_(0.0, vc.hidden_size ** -0.5)
    state = hf.state_dict()
    model = load_weights(text_cfg, ((n, t, "transformers") for k, t in state.items()
                                    if (n := family.hf_param_name(k)) is not None), max_context=4096)
    vision = vision_from_tensors(vc, ((k, t, "transformers") for k, t in state.items()))
    shared = model.embed_tokens.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    build_s = time.perf_counter() - t0
    tok = Tokenizer(tokenizer_for("preset", None))
    photo = Image.open(PHOTO)
    cases = {
        "image+text": (photo, ImageSettings()),
        "pan-and-scan": (photo.resize((1400, 600), Image.BICUBIC), ImageSettings(pan_and_scan=True)),
    }
    rows = []
    for name, (image, settings) in cases.items():
        if name not in args.cases.split(","):
            continue
        p = image_prompt(tok, vc, settings, "Describe this image in detail.", [image], chat=True)
        ids = torch.tensor([p.ids])
        px = torch.from_numpy(p.pixels)
        tt = (ids == vc.image_token_id).long()
        is_image = ids[0] == vc.image_token_id
        t = time.perf_counter()
        with torch.no_grad():
            # one view at a time: a 4,096-patch view's attention scores are 1 GB per layer
            ours_img = torch.cat([vision(px[i:i + 1]) for i in range(len(px))])
            ref_img = torch.cat([hf.model.get_image_features(px[i:i + 1]).pooler_output for i in range(len(px))])
            if len(px) == 1:  # transformers' own path end to end: pixels in, generate
                ref = hf(input_ids=ids, pixel_values=px, token_type_ids=tt, use_cache=False, logits_to_keep=0)
                ref_tokens = hf.generate(input_ids=ids, pixel_values=px, token_type_ids=tt, do_sample=False,
                                         max_new_tokens=args.new_tokens, eos_token_id=list(tok.stop_ids))
                ref_tokens = ref_tokens[0, ids.shape[1]:].tolist()
                keep = ids.shape[1]
            else:  # its image features placed as its forward places them (all views at once would not
                # fit), logits from the last <end_of_image> on (all of them would not fit either)
                embeds = hf.model.get_input_embeddings()(torch.where(is_image, 0, ids[0])[None])
                embeds = embeds.masked_scatter(is_image[None, :, None].expand_as(embeds), ref_img.reshape(-1, ref_img.shape[-1]))
                keep = ids.shape[1] - int(is_image.nonzero().max())
                ref = hf(inputs_embeds=embeds, token_type_ids=tt, use_cache=False, logits_to_keep=keep)
                del embeds
                ref_tokens = None
            ref = ref.logits[0]
            x = model.embed(torch.where(is_image, 0, ids[0])[None])
            x = place(x, ids[0], ours_img, vc.image_token_id)
            # prefill through the first kept position (all of them in the first case), then decode steps
            n = ids.shape[1] if keep == ids.shape[1] else ids.shape[1] - keep + 1
            first, cache = model.decode(x[:, :n], torch.tensor([0]), torch.tensor([n]), model.new_cache(),
                                        all_logits=keep == ids.shape[1],
                                        groups=image_groups(ids[0, :n], vc.image_token_id))
            rows_ = [first[0]]
            for q in range(n, ids.shape[1]):
                lg, cache = model.step(ids[:, q:q + 1], torch.tensor([q]), torch.tensor([1]), cache)
                rows_.append(lg[0])
            ours = torch.cat(rows_)
            del x, cache, rows_
        our_tokens = None
        if ref_tokens is not None:
            session = TorchSession(model)
            logits, session.cache = prefill(model, vision, p)
            our_tokens = list(continue_from(session, logits, len(p.ids), args.new_tokens, tok.stop_ids))
        row = {
            "case": name, "views": p.views[0], "prompt_tokens": len(p.ids), "positions_compared": int(keep),
            "vision_max_abs_diff_relative": float((ours_img - ref_img).abs().max() / ref_img.abs().max()),
            "vision_embedding_rms": float(ref_img.pow(2).mean().sqrt()),
            "logits_top1": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
            "logits_mean_kl": kl(ref, ours),
            "logits_max_abs_diff": float((ours - ref).abs().max()),
            "greedy_equal": None if ref_tokens is None else our_tokens == ref_tokens,
            "greedy_tokens": None if ref_tokens is None else len(our_tokens),
            "seconds": round(time.perf_counter() - t, 1),
        }
        del ref, ours
        print(row, flush=True)
        rows.append(row)
    out = {"command": "python -m benchmarks.vision", "model": "gemma3-4b (random weights, transformers' init)",
           "vision_parameters": vc.param_count(), "text_parameters": text_cfg.param_counts()["total"],
           "weights_shared_with_transformers": shared, "build_seconds": round(build_s, 1),
           "peak_rss_gib": round(peak_gib(), 2), "cases": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "vision-4b-parity.json"
    if path.is_file():  # rows of cases not run this time stay
        ran = {r["case"] for r in rows}
        out["cases"] = [r for r in json.loads(path.read_text())["cases"] if r["case"] not in ran] + rows
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
