"""Parameter counts and memory figures computed from a config (no weights needed)."""

from __future__ import annotations

from .gemma3.config import Gemma3Config

BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}


# an int8 cache's float32 scale and int8 zero point per token and KV head (per-token quantization)
KV_INT8_EXTRA = 5


def kv_bytes_per_position(cfg: Gemma3Config, dtype: str = "float32") -> float:
    """Bytes one layer's K and V hold per cached position."""
    extra = KV_INT8_EXTRA if dtype == "int8" else 0
    return 2 * cfg.num_kv_heads * (cfg.head_dim * BYTES[dtype] + extra)


def kv_cache_bytes(cfg: Gemma3Config, context: int, window_sized: bool, dtype: str = "float32") -> int:
    """`dtype` is what the global layers' caches hold; local layers' rings stay float32 (as
    `export --kv-dtype` lays them out: Gemma3.set_kv_dtype)."""
    total = 0
    for i in range(cfg.num_layers):
        length = cfg.cache_len(i, context) if window_sized else context
        total += length * kv_bytes_per_position(cfg, dtype if cfg.is_global(i) else "float32")
    return int(total)


def artifact_bytes(cfg: Gemma3Config, recipe, fmt: str, images: bool = False) -> int:
    """A generous estimate of the disk an export to `fmt` needs, staging copies included (checked
    against free space before any work): the weights at the recipe's widest scheme, the TFLite
    model written once more into its LiteRT-LM bundle, and the tokenizer. With `images`, an ONNX
    folder's embedding graph holds the token table once more (the vision tower is counted apart)."""
    bits = max((r.scheme.bits for r in recipe.rules if r.scheme is not None), default=32)
    per_weight = bits / 8 + (0.07 if bits < 8 else 0.0)
    # qnn: a prefill and a decode graph, each as QDQ source and as a context binary per SoC (two)
    copies = {"tflite": 2.0, "qnn": 6.0}.get(fmt, 1.2)
    table = cfg.vocab_size * cfg.hidden_size * per_weight if images and fmt == "onnx" else 0
    return int(cfg.param_counts()["total"] * per_weight * copies + table) + 40 * 2**20


def report(cfg: Gemma3Config, context: int, kv_dtype: str = "float32") -> dict:
    params = cfg.param_counts()
    window = kv_cache_bytes(cfg, context, True, kv_dtype)
    full = kv_cache_bytes(cfg, context, False, kv_dtype)
    n_global = sum(cfg.is_global(i) for i in range(cfg.num_layers))
    return {
        "config": cfg.to_dict(),
        "layers": {"local": cfg.num_layers - n_global, "global": n_global},
        "parameters": params,
        "weight_bytes": {d: int(params["total"] * b) for d, b in BYTES.items()},
        "kv_cache": {
            "context": context,
            "dtype": kv_dtype,
            "window_sized_bytes": window,
            "full_length_bytes": full,
            "window_over_full": window / full,
            # what one more token of conversation adds once every local ring is full (global layers)
            "bytes_per_token": int(n_global * kv_bytes_per_position(cfg, kv_dtype)),
            "bytes_per_token_all_layers": int(n_global * kv_bytes_per_position(cfg, kv_dtype)
                                              + (cfg.num_layers - n_global) * kv_bytes_per_position(cfg)),
        },
    }


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_report(r: dict) -> str:
    c, p, kv = r["config"], r["parameters"], r["kv_cache"]
    lines = [
        f"model            {c['name']}",
        f"layers           {c['num_layers']} ({r['layers']['local']} local, window {c['sliding_window']}; "
        f"{r['layers']['global']} global)",
        f"hidden           {c['hidden_size']}, FFN {c['intermediate_size']}, heads {c['num_heads']} "
        f"(KV {c['num_kv_heads']}), head dim {c['head_dim']}",
        f"vocabulary       {c['vocab_size']:,}",
        f"rope             local base {c['rope_local_base']:g}, global base {c['rope_global_base']:g}"
        f" (linear scaling {c['rope_global_scaling']:g})",
        "parameters",
    ]
    for key in ("embedding", "attention", "mlp", "norms", "total"):
        lines.append(f"  {key:<14} {p[key]:>15,}")
    lines.append("weights")
    for dtype, n in r["weight_bytes"].items():
        lines.append(f"  {dtype:<14} {_mb(n):>15}")
    layout = "" if kv["dtype"] == "float32" else " on global layers, local rings float32"
    lines += [
        f"KV cache at context {kv['context']:,} ({kv['dtype']}{layout})",
        f"  window-sized   {_mb(kv['window_sized_bytes']):>15}",
        f"  full-length    {_mb(kv['full_length_bytes']):>15}",
        f"  ratio          {kv['window_over_full']:>15.1%}",
        f"  per token      {kv['bytes_per_token']:>11,} B  (global layers; {kv['bytes_per_token_all_layers']:,} B "
        f"while the window fills)",
    ]
    v = r.get("vision")
    if v:
        vc = v["config"]
        lines += [
            f"vision encoder   SigLIP, {vc['num_layers']} layers, hidden {vc['hidden_size']}, "
            f"{vc['image_size']}px in {vc['patch_size']}px patches -> {vc['tokens_per_image']} tokens per image",
            f"  parameters     {v['parameters']:>15,}",
        ]
    q = r.get("quantization")
    if q:
        lines.append(f"recipe {q['recipe']}: tensor, type in the checkpoint, what the recipe does; per format")
        for row in q["tensors"]:
            formats = "; ".join(f"{f} {what}" for f, what in row["formats"].items())
            lines.append(f"  {row['tensor']:<28} {row['source']:<5} -> {row['recipe']:<28} {formats}")
        lines.append("summary")
        lines += [f"  {n:>4} x {what}" for what, n in q["summary"].items()]
        lines += [f"  {f:<7} {what}" for f, what in q["formats"].items()]
    return "\n".join(lines)
