"""Peer artifacts: what each stock runtime's OWN exporter makes from the bundled Gemma 3 270M.

`benchmarks.runtimes` compares our artifact with these, inside the same runtime. Both sides must
start from the same weights, so the peers are built from a Hugging Face folder written from OUR
loaded fp32 module (`hf_from_model` copies its tensors): any difference in the results comes from
the exporter and its quantizer, not from a second GGUF dequantization.

  genai_builder(out, precision)    onnxruntime-genai's model builder (`-p int4|int8 -e cpu`)
  optimum_executorch(out, qlinear) optimum-executorch's XNNPACK recipe (`--qlinear 8da4w|8da8w`)
  litert_torch(out, recipe)        litert-torch's HF exporter, bundled as .litertlm
                                   (`dynamic_wi4b32_afp32|dynamic_wi8_afp32`)

Usage (one export per process, so its peak RSS is its own):
  python -m benchmarks.peers genai-builder OUT int4
  python -m benchmarks.peers optimum-executorch OUT 8da4w
  python -m benchmarks.peers litert-torch OUT dynamic_wi4b32_afp32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HF_DIR = ROOT / "out" / "bench-runtimes" / "hf-gemma3-270m"
CONTEXT = 2048  # our artifacts are exported with --max-context 2048: the peers get the same context


def hf_folder(target: Path = HF_DIR) -> Path:
    """A transformers folder (config.json, model.safetensors, tokenizer) holding our fp32 weights.

    transformers refuses save_pretrained on a GGUF-loaded model, but a Gemma3ForCausalLM filled
    from our module saves normally. The tokenizer is ours too, with the tokenizer_config.json that
    AutoTokenizer (and so both peer exporters) needs beside tokenizer.json. Written once.
    """
    done = target / ".complete"
    if done.is_file():
        return target
    from gemma_export.gemma3 import family
    from gemma_export.gemma3.reference import hf_from_model
    from gemma_export.loading import ModelSpec, load

    loaded = load(ModelSpec("gemma3-270m"))
    hf = hf_from_model(loaded.take_model())
    hf.config.max_position_embeddings = CONTEXT  # the exporters size rope tables / caches from this
    target.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(target)
    shutil.copyfile(loaded.tokenizer_path, target / "tokenizer.json")
    tokens = {f"{k}_token": v for k, v in family.SPECIAL_TOKENS.items() if k in ("bos", "eos", "pad")}
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, **tokens,
        "model_max_length": CONTEXT, "chat_template": family.CHAT_JINJA}, indent=2))
    done.touch()
    return target


def flatten_rope(config) -> None:
    """Give a transformers-5 Gemma 3 config the flat RoPE fields the genai builder reads.

    transformers 5 nests RoPE per layer type (`rope_parameters = {full_attention: {...},
    sliding_attention: {...}}`); builder 0.18 indexes `rope_parameters["rope_type"]` (KeyError
    otherwise), takes the global base from `rope_theta` (silently 10,000 if absent) and the local
    base from `rope_local_base_freq`.
    """
    nested = config.rope_parameters
    if "full_attention" not in nested:
        return
    full, local = nested["full_attention"], nested["sliding_attention"]
    if full.get("rope_type", "default") != "default":
        raise NotImplementedError(f"flattening only covers default RoPE, got {full}")
    config.rope_parameters = dict(full)
    config.rope_theta = full["rope_theta"]
    config.rope_local_base_freq = local["rope_theta"]


def genai_builder(out: Path, precision: str, extra: tuple[str, ...] = ()) -> dict:
    """onnxruntime-genai's builder on our weights, CPU, its default options for `precision`.

    Driven through its Python entry points (what `python -m onnxruntime_genai.models.builder`
    runs) so the loaded config can be flattened between parsing and building.
    """
    from onnxruntime_genai.models import builder

    hf, out = hf_folder(), Path(out)
    cache = out.parent / f"{out.name}-cache"
    opts = builder.parse_extra_options(None, str(hf), str(out), precision, "cpu", str(cache), list(extra))
    flatten_rope(opts["hf_details"]["hf_config"])
    builder.create_model(None, str(hf), str(out), precision, "cpu", str(cache), **opts)
    shutil.rmtree(cache, ignore_errors=True)
    return {"exporter": "onnxruntime-genai builder", "precision": precision, "execution_provider": "cpu",
            "extra_options": list(extra)}


def optimum_executorch(out: Path, qlinear: str, qembedding: str | None = None, custom_ops: bool = False) -> dict:
    """optimum-executorch's XNNPACK recipe on our weights (`qlinear` 8da4w / 8da8w, group 32).

    The call `optimum-cli export executorch --task text-generation --recipe xnnpack --qlinear Q
    --max_seq_len 2048` makes, through `main_export`: the `optimum-cli` front end lives in the base
    `optimum` package, which is not installed here. Its faster LLM path (`--use_custom_sdpa
    --use_custom_kv_cache`, `custom_ops=True`) imports `transformers.cache_utils.HybridCache`,
    which transformers 5.24 no longer has (optimum-executorch 1.1.0 pins transformers 5.0.0rc1),
    so by default the peer is exported without it.
    """
    _optimum_shim()
    from optimum.exporters.executorch.__main__ import main_export

    hf, out = hf_folder(), Path(out)
    kwargs = {"qlinear": qlinear, "max_seq_len": CONTEXT}
    if custom_ops:
        kwargs.update(use_custom_sdpa=True, use_custom_kv_cache=True)
    if qembedding:
        kwargs["qembedding"] = qembedding
    main_export(model_name_or_path=str(hf), task="text-generation", recipe="xnnpack", output_dir=str(out), **kwargs)
    shutil.copyfile(hf / "tokenizer.json", out / "tokenizer.json")
    shutil.copyfile(hf / "tokenizer_config.json", out / "tokenizer_config.json")
    return {"exporter": "optimum-executorch", "task": "text-generation", "recipe": "xnnpack", **kwargs}


def litert_torch(out: Path, recipe: str) -> dict:
    """litert-torch's Hugging Face exporter on our weights, bundled for LiteRT-LM.

    What `litert-torch export_hf --model HF --output_dir OUT --quantization_recipe R
    --prefill_lengths 128 --cache_length 2048 --bundle_litert_lm` runs, with the same prefill chunk
    and context as ours. Its defaults keep a full-length cache on every layer (its ring-buffer
    option is not used: it failed on Gemma 3 in trials, see STACK-NOTES).
    """
    _tensorflow_schema_shim()
    from litert_torch.generative.export_hf import export as export_hf

    hf, out = hf_folder(), Path(out)
    kwargs = {"prefill_lengths": [128], "cache_length": CONTEXT, "quantization_recipe": recipe,
              "bundle_litert_lm": True}
    export_hf.export(model=str(hf), output_dir=str(out), **kwargs)
    bundles = sorted(out.glob("*.litertlm"))
    if len(bundles) != 1:
        raise SystemExit(f"litert-torch wrote {len(bundles)} .litertlm bundles in {out}")
    shutil.copyfile(hf / "tokenizer.json", out / "tokenizer.json")
    return {"exporter": "litert-torch export_hf", "bundle": bundles[0].name, **kwargs}


def _tensorflow_schema_shim() -> None:
    """litert-torch's generative layers import TensorFlow's TFLite flatbuffer schema
    (`tensorflow.lite.python.schema_py_generated`), an undeclared dependency; ai-edge-litert ships
    the same generated module. Alias it, nothing else of TensorFlow."""
    try:
        import tensorflow.lite.python.schema_py_generated  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.machinery
    import types

    from ai_edge_litert import schema_py_generated

    def stub(name):  # with a spec: torch.compile's import probes call find_spec on it
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        m.__path__ = []
        return m

    names = ["tensorflow", "tensorflow.lite", "tensorflow.lite.python"]
    mods = {n: sys.modules.get(n) or stub(n) for n in names}
    mods["tensorflow.lite.python"].schema_py_generated = schema_py_generated
    sys.modules.update(mods)
    sys.modules["tensorflow.lite.python.schema_py_generated"] = schema_py_generated


def _optimum_shim() -> None:
    """optimum-executorch 1.1.0 imports two things from the base `optimum` package it declares but
    that is not installed here: `is_transformers_version`, and the CLI base classes its argument
    parser module subclasses (imported by the export entry point, unused without optimum-cli).
    Provide just those."""
    try:
        import optimum.commands.base  # noqa: F401
        import optimum.utils.import_utils  # noqa: F401
        return
    except ImportError:
        pass
    import operator
    import types

    import transformers
    from packaging import version

    ops = {"<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">=": operator.ge,
           ">": operator.gt}

    def is_transformers_version(op: str, wanted: str) -> bool:
        return ops[op](version.parse(transformers.__version__), version.parse(wanted))

    utils = types.ModuleType("optimum.utils")
    import_utils = types.ModuleType("optimum.utils.import_utils")
    import_utils.is_transformers_version = is_transformers_version
    utils.import_utils = import_utils
    base = types.ModuleType("optimum.commands.base")
    base.BaseOptimumCLICommand = type("BaseOptimumCLICommand", (), {})
    base.CommandInfo = lambda **kw: types.SimpleNamespace(**kw)
    sys.modules.update({"optimum.utils": utils, "optimum.utils.import_utils": import_utils,
                        "optimum.commands.base": base})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exporter", choices=["genai-builder", "optimum-executorch", "litert-torch", "hf-folder"])
    ap.add_argument("out", type=Path)
    ap.add_argument("quant", nargs="?", help="int4|int8 (genai-builder), 8da4w|8da8w (optimum-executorch), "
                    "an ai-edge-quantizer recipe (litert-torch)")
    args = ap.parse_args(argv)
    if args.exporter == "hf-folder":
        info = {"hf_folder": str(hf_folder(args.out))}
    elif args.exporter == "genai-builder":
        info = genai_builder(args.out, args.quant)
    elif args.exporter == "litert-torch":
        info = litert_torch(args.out, args.quant)
    else:
        info = optimum_executorch(args.out, args.quant)
    if args.exporter != "hf-folder":
        (args.out / "peer-export.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
