"""The `gemma-export` command line: flags -> one library call (gemma_export.api) -> print.

Heavy packages (torch, exporters, runtimes) are imported inside commands, so `--help` is instant.
Every command reports an error as one line on stderr with an exit code: 1 error, 2 usage,
3 parity failure; `--json` prints the command's result as one JSON document on stdout.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import click

import calibration

from . import backends, quiet
from . import matrix as release
from .errors import ExportError
from .gemma3.config import PRESETS as MODELS
from .sizes import format_report
from .loading import BUNDLED_PRESET, ModelSpec
from .quant.recipes import PRESETS as RECIPES
from .session import Sampling
from .verification import report as render
from .verification.bundle import BundlePlan
from .verification.check import EvalPlan, VerifyPlan

# ----------------------------------------------------------------------------------------------
# Shared pieces: the error boundary and options declared once
# ----------------------------------------------------------------------------------------------


def error_boundary(fn):
    """Typed errors become one line and an exit code; nothing else escapes as a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ExportError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            click.echo(f"Error: interrupted by {signal.Signals(signum).name}; nothing was left half-written",
                       err=True)
            sys.exit(128 + signum)
        except click.exceptions.ClickException:
            raise
        except Exception as e:  # an internal bug: still one line, traceback on request
            if os.environ.get("GEMMA_EXPORT_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"Error: internal error: {type(e).__name__}: {msg} (set GEMMA_EXPORT_DEBUG=1 for a traceback)",
                       err=True)
            sys.exit(1)

    return wrapper


def _options(*decorators):
    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return apply


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as one JSON document on stdout (for CI).")
threads_option = click.option("--threads", type=int, default=2, show_default=True, help="CPU threads.")
model_options = _options(
    click.option("--random-weights", is_flag=True, help="Seeded random weights at full size (no checkpoint)."),
    click.option("--weights-seed", type=int, default=0, show_default=True, help="Seed for --random-weights."),
)
runtime_options = _options(
    click.option("--max-context", type=int, default=None,
                 help="Longest sequence the KV cache holds [default: 4096, or the model's limit if smaller]."),
    click.option("--prefill-len", type=int, default=128, show_default=True,
                 help="Tokens per prefill chunk (static shape)."),
)
reference_option = click.option("--reference", default=None,
                                help="PyTorch model to compare with [default: the model the artifact came from].")
text_option = click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
                           help="Text to teacher-force [default: the bundled held-out English text].")
greedy_options = _options(
    click.option("--new-tokens", type=int, default=32, show_default=True, help="Greedy tokens to compare."),
    click.option("--prompt", default="The capital of France is", show_default=True, help="Prompt for the greedy run."),
)
image_options = _options(
    click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
                 help="For an artifact with image entry points: the image(s) of the image prompts, run as they are "
                      "and with pan-and-scan [default: a photograph from matplotlib's sample data, widened for "
                      "pan-and-scan]."),
    click.option("--no-images", is_flag=True, help="Skip the image prompts."),
)


def _text(text) -> Path:
    return Path(text) if text else calibration.EVAL_TEXT


def _spec(model, random_weights, weights_seed, max_context=None, mmproj=None):
    return ModelSpec(model, random_weights=random_weights, seed=weights_seed, max_context=max_context, mmproj=mmproj)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


class _Progress:
    """Stage lines on stderr, stamped with the elapsed time (and memory, for exports). On a
    terminal, loops over positions also show a live count with the running figures; a CI log (no
    terminal) gets the stage lines only."""

    FIGURES = {"top1": ("top-1", "{:.2%}"), "mean_kl": ("mean KL", "{:.3g}"), "perplexity": ("ppl", "{:.4g}")}

    def __init__(self, memory: bool = False):
        self.start, self.memory = time.perf_counter(), memory
        self.live = sys.stderr.isatty()
        self._shown, self._open = 0.0, False

    def _stamp(self) -> str:
        stamp = f"{time.perf_counter() - self.start:7.1f}s"
        if self.memory:
            rss, peak = memory_gib()
            stamp += f" rss {rss:5.1f} GiB peak {peak:5.1f} GiB"
        return stamp

    def __call__(self, msg: str) -> None:
        self._clear()
        click.echo(f"[{self._stamp()}] {msg}", err=True)

    def step(self, done: int, total: int, figures) -> None:
        now = time.perf_counter()
        if not self.live or (now - self._shown < 0.25 and done < total):
            return
        self._shown = now
        shown = "".join(f"  {self.FIGURES[k][0]} {self.FIGURES[k][1].format(v)}"
                        for k, v in figures().items() if k in self.FIGURES)
        click.echo(f"\r\033[K[{self._stamp()}] {done:,}/{total:,} positions{shown}", err=True, nl=False)
        self._open = True

    def _clear(self) -> None:
        if self._open:
            click.echo("\r\033[K", err=True, nl=False)
            self._open = False


def _progress(memory: bool = False) -> _Progress:
    return _Progress(memory)


def memory_gib() -> tuple[float, float]:
    """Current and peak resident memory of this process, in GiB (Linux)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        rss = float("nan")
    return rss, peak


def parse_formats(value: str) -> tuple[str, ...]:
    """`onnx`, `onnx,pte` or `all` -> the formats, in the order given (runtime names such as
    `ort-genai` or `litertlm` name their format)."""
    names = backends.NAMES if value.strip() == "all" else tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if backends.ALIASES.get(n, n) not in backends.REGISTRY]
    if bad or not names:
        raise click.BadParameter(f"{', '.join(bad) or repr(value)} is not a format; choose from "
                                 f"{', '.join(backends.REGISTRY)} (comma-separated) or all (= {', '.join(backends.NAMES)}); "
                                 f"{', '.join(f'{a} = {n}' for a, n in backends.ALIASES.items())}")
    names = tuple(backends.canonical(n) for n in names)
    if len(set(names)) < len(names):
        raise click.BadParameter(f"a format is named twice in {value!r}")
    return names


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gemma-export")
def cli():
    """Export Gemma 3 to on-device formats and prove the artifacts match PyTorch.

    MODEL is a preset name (see `gemma-export models`), a Hugging Face checkpoint folder,
    a .gguf file, or an exported artifact folder.
    """


@cli.command()
@json_option
@error_boundary
def models(as_json):
    """List the model presets."""
    rows = [{"name": name, "parameters": cfg.param_counts()["total"], "layers": cfg.num_layers,
             "window": cfg.sliding_window, "max_context": cfg.max_position_embeddings,
             "weights": "bundled (real, GGUF Q4_K_M)" if name == BUNDLED_PRESET else "--random-weights or a checkpoint"}
            for name, cfg in MODELS.items()]
    if as_json:
        return _echo_json(rows)
    for r in rows:
        click.echo(f"{r['name']:<12} {r['parameters'] / 1e6:>9,.1f}M params  {r['layers']:>2} layers  "
                   f"window {r['window']:>4}  context {r['max_context']:>7,}  weights: {r['weights']}")


@cli.command()
@click.argument("model")
@click.option("--context", type=int, default=None, help="Context length for the KV cache figures (default: model max).")
@click.option("--kv-dtype", type=click.Choice(["fp32", "fp16", "float32", "bfloat16", "float16", "int8"]), default="float32",
              show_default=True, help="The global layers' cache dtype for the KV figures, as export --kv-dtype "
                                      "lays them out (local rings stay float32; int8 with its scale and zero "
                                      "point per token and head).")
@click.option("--recipe", default=None,
              help="Also list each weight's quantization type in the checkpoint and what this recipe (and "
                   "each format) does with it, e.g. --recipe source.")
@click.option("--mmproj", type=click.Path(exists=True, dir_okay=False), default=None,
              help="llama.cpp's Gemma 3 vision file (mmproj GGUF) beside a GGUF MODEL: show its vision encoder.")
@json_option
@error_boundary
def inspect(model, context, kv_dtype, recipe, mmproj, as_json):
    """Print a model's config, parameter counts and memory figures (no weights are loaded)."""
    from . import api

    r = api.inspect(model, context, {"fp32": "float32", "fp16": "float16"}.get(kv_dtype, kv_dtype), recipe, mmproj)
    click.echo(json.dumps(r, indent=2) if as_json else format_report(r))


@cli.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the Gemma chat format.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (with --temperature).")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An image for the prompt (repeatable; 4B and larger, or an artifact exported with images): "
                   "it goes where the prompt holds <start_of_image>, else before the text.")
@click.option("--pan-and-scan", is_flag=True,
              help="Also show the encoder crops of elongated images (Gemma 3's pan-and-scan).")
@click.option("--mmproj", type=click.Path(exists=True, dir_okay=False), default=None,
              help="llama.cpp's Gemma 3 vision file (mmproj GGUF) for a GGUF text MODEL, for --image.")
@model_options
@runtime_options
@threads_option
@json_option
@error_boundary
def generate(model, prompt, chat, max_new_tokens, temperature, top_k, seed, images, pan_and_scan, mmproj, random_weights,
             weights_seed, max_context, prefill_len, threads, as_json):
    """Stream generated text from a PyTorch model or an exported artifact."""
    from . import api

    opened = api.open(model, prefill_len=prefill_len, threads=threads,
                      spec=_spec(model, random_weights, weights_seed, max_context, mmproj))
    out = opened.generate(prompt, max_new_tokens, chat, Sampling(temperature, top_k, seed),
                          on_text=None if as_json else lambda text: click.echo(text, nl=False), images=images,
                          pan_and_scan=pan_and_scan)
    if as_json:
        return _echo_json({"prompt_tokens": out.prompt_tokens, "tokens": out.tokens, "text": out.text,
                           "time_to_first_token_s": out.time_to_first_token_s, "total_s": out.total_s})
    click.echo()


@cli.command()
@click.argument("model")
@click.option("--format", "fmt", required=True, callback=lambda ctx, param, v: parse_formats(v),
              help="Artifact format: pte (ExecuTorch's LLM runner), onnx (an onnxruntime-genai model "
                   "folder; also ort-genai) or tflite (also litertlm); several comma-separated, or all "
                   "(quantized and calibrated once, one artifact per format under --out); or the NPU target "
                   "qnn (Qualcomm Hexagon: QDQ graphs compiled per --soc).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Artifact folder to create (several formats: a build folder holding OUT/FORMAT).")
@click.option("--recipe", default="fp32", show_default=True, help="Quantization recipe (preset name or .toml file).")
@click.option("--kv-dtype", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="What the global layers' KV caches hold, replacing the recipe's (default fp32): fp16, half "
                   "of fp32's memory, or int8, codes with a scale and zero point per token and KV head, about a "
                   "quarter (pte). Local layers' window-sized rings stay fp32. Recorded in the recipe (named "
                   "RECIPE+kv-fp16 / +kv-int8) and judged by verify.")
@click.option("--force", is_flag=True, help="Replace an existing artifact folder, and export even when the machine "
                                            "has less memory available than the export's estimate of its peak.")
@click.option("--debug-outputs/--no-debug-outputs", default=True, show_default=True,
              help="Include the entry points only verification uses: per-layer hidden states "
                   "(`verify --locate`) and, in TFLite, prefill with logits (faster `verify`).")
@click.option("--build-record", type=click.Path(dir_okay=False), default=None,
              help="Write when the export ran, its stage timings and peak memory to this JSON file "
                   "(kept out of the artifact, whose bytes depend only on the inputs).")
@click.option("--images/--no-images", default=True, show_default=True,
              help="For a model with a vision encoder (4B and larger): also the image entry points (vision "
                   "encoder, embeddings into the decoder), with the preprocessing settings in the manifest.")
@click.option("--mmproj", type=click.Path(exists=True, dir_okay=False), default=None,
              help="llama.cpp's Gemma 3 vision file (mmproj GGUF) for a GGUF text MODEL.")
@click.option("--soc", "socs", multiple=True, default=("SM8650",), show_default=True,
              help="For --format qnn: the Snapdragon SoC to compile for (SM8550, SM8650, SM8750); repeat for several.")
@model_options
@runtime_options
@threads_option
@json_option
@error_boundary
def export(model, fmt, out, recipe, kv_dtype, force, debug_outputs, build_record, images, mmproj, socs, random_weights,
           weights_seed, max_context, prefill_len, threads, as_json):
    """Export MODEL to an artifact folder (model file, tokenizer, manifest.json)."""
    import torch

    from . import api

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    manifests = api.export(_spec(model, random_weights, weights_seed, mmproj=mmproj), fmt, out,
                           _progress(memory=True), recipe=recipe, prefill_len=prefill_len, max_context=max_context,
                           debug_outputs=debug_outputs, force=force, record=build_record, images=images,
                           socs=tuple(socs), kv_dtype=kv_dtype)
    if as_json:  # one format: its manifest; several: a list of them, in --format order
        dicts = [m.to_dict() for m in manifests]
        return _echo_json(dicts[0] if len(fmt) == 1 else dicts)
    outs = [Path(out)] if len(fmt) == 1 else [Path(out) / f for f in fmt]
    for path, m in zip(outs, manifests):
        size = sum(f.bytes for f in m.files.values())
        click.echo(f"{path}: {m.format} artifact, {size / 2**20:,.1f} MiB, {len(m.files)} files")
    click.echo(f"exported in {time.perf_counter() - t0:.1f} s")
    if len(fmt) > 1:
        click.echo(f"check them all: gemma-export verify --all {out}")


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--all", "all_", is_flag=True, help="ARTIFACT is a build folder: verify every artifact in it, and "
              "compare the artifacts with each other.")
@reference_option
@text_option
@click.option("--positions", type=int, default=1300, show_default=True, help="Teacher-forced positions.")
@greedy_options
@click.option("--min-top1", type=float, default=None, help="Replace the judge's top-1 bound (reported).")
@click.option("--max-mean-kl", type=float, default=None, help="Replace the judge's mean-KL bound (reported).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.md, parity.png and report.json into this folder.")
@click.option("--outputs", "outputs_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Check outputs produced by a bundle runner (phone, simulator, desktop) instead of running.")
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="The golden bundle the --outputs came from [default: the one named in the outputs' index.json].")
@click.option("--locate", is_flag=True, help="Also name the first decoder layer whose hidden state diverges.")
@click.option("--locate-threshold", type=float, default=None,
              help="Relative error that counts as diverging for --locate [default: 0.01].")
@image_options
@threads_option
@json_option
@error_boundary
def verify(artifact, all_, reference, text, positions, new_tokens, prompt, min_top1, max_mean_kl, report_dir,
           outputs_dir, bundle_dir, locate, locate_threshold, images, no_images, threads, as_json):
    """Check an artifact against the PyTorch reference (exit 0 pass, 3 parity failure, 1 error)."""
    from . import api

    overrides = {k: v for k, v in (("min_top1", min_top1), ("max_mean_kl", max_mean_kl)) if v is not None}
    if outputs_dir:
        result = api.check_outputs(outputs_dir, bundle_dir, artifact, overrides)
        _show(as_json, result.report, render.outputs_lines(result.report))
        result.raise_if_failed()
        done = f"PASS {outputs_dir} against bundle {result.report['bundle']} ({result.report['format']})"
    elif not artifact:
        raise click.UsageError("give an ARTIFACT (or a build folder with --all, or --outputs DIR)")
    elif all_:
        plan = VerifyPlan(_text(text), positions, new_tokens, prompt, reference, overrides, threads, locate,
                          locate_threshold, None if no_images else tuple(images))
        result = api.verify(artifact, True, plan, _progress())
        if report_dir:
            render.write_build_report(report_dir, result)
        _show(as_json, result.to_dict(), [render.build_table(result)])
        result.raise_if_failed()
        done = f"PASS all {len(result.rows)} artifacts in {artifact}"
    else:
        plan = VerifyPlan(_text(text), positions, new_tokens, prompt, reference, overrides, threads, locate,
                          locate_threshold, None if no_images else tuple(images))
        result = api.verify(artifact, False, plan, _progress())
        if report_dir:
            render.write_report(report_dir, result)
        _show(as_json, result.report, render.summary_lines(result.report))
        result.raise_if_failed()
        done = f"PASS {artifact} ({result.report['format']}) against {result.report['reference']}"
    if not as_json:
        click.echo(done)


def _show(as_json: bool, data: dict, lines: list[str]) -> None:
    if as_json:
        _echo_json(data)
    else:
        click.echo("\n".join(lines))


@cli.command(name="lint")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(file_okay=False))
@json_option
@error_boundary
def lint_command(artifacts, as_json):
    """Check artifact folders before they ship: manifest schema, files and hashes, tokenizer,
    recipe, and entry points read from the model file (exit 0 clean, 1 with one line per problem)."""
    from . import api

    reports = [api.lint(a) for a in artifacts]
    if as_json:
        _echo_json(reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports])
    else:
        for artifact, report in zip(artifacts, reports):
            if report.passed:
                click.echo(f"{artifact}: {report.format} artifact, no problems")
            for p in report.problems:
                click.echo(f"{artifact}: {p.line()}", err=True)
    if not all(r.passed for r in reports):
        sys.exit(1)


@cli.command()
@click.argument("build_file", type=click.Path(dir_okay=False))
@click.option("--format", "style", type=click.Choice(["json", "github"]), default="json", show_default=True,
              help="json: the job list; github: the strategy.matrix object (one include entry per job).")
@error_boundary
def matrix(build_file, style):
    """Print the jobs of a release description (BUILD.toml) for a CI matrix: one job per model x
    recipe x format, formats of a calibrated recipe sharing one job (one calibration)."""
    jobs = release.plan(release.read_release(build_file))
    if style == "github":
        click.echo(json.dumps(release.github_matrix(jobs), separators=(",", ":")))
    else:
        _echo_json({"jobs": [j.to_dict() for j in jobs]})


@cli.command()
@json_option
@error_boundary
def recipes(as_json):
    """List the quantization recipes (presets; a .toml file works wherever a name does)."""
    formats = {f: backends.supported_presets(f) for f in backends.REGISTRY}
    rows = [{**r.to_dict(), "formats": [f for f in backends.REGISTRY if r.name in formats[f]]} for r in RECIPES.values()]
    if as_json:
        return _echo_json(rows)
    for r in rows:
        click.echo(f"{r['name']:<14} {','.join(r['formats']) or '-':<16} {r['description']}")


@cli.command(name="eval")
@click.argument("model")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text to score [default: the bundled held-out English text].")
@click.option("--positions", type=int, default=2048, show_default=True, help="Tokens of the text to score.")
@click.option("--recipe", default="fp32", show_default=True,
              help="For a PyTorch MODEL: quantize it in PyTorch with this recipe first.")
@click.option("--reference", default=None,
              help="fp32 PyTorch model to compare with (KL, top-1) [default: MODEL's own source].")
@click.option("--no-reference", is_flag=True, help="Perplexity only.")
@model_options
@runtime_options
@threads_option
@json_option
@error_boundary
def evaluate(model, text, positions, recipe, reference, no_reference, random_weights, weights_seed, max_context,
             prefill_len, threads, as_json):
    """Perplexity of MODEL (PyTorch or artifact) on a text, and KL / top-1 agreement against fp32."""
    from . import api

    result = api.evaluate(model, _spec(model, random_weights, weights_seed, max_context), recipe, prefill_len,
                          EvalPlan(_text(text), positions, reference, not no_reference, threads), _progress())
    if as_json:
        return _echo_json(result)
    for k, v in result.items():
        click.echo(f"{k:<22} {v:.6g}" if isinstance(v, float) else f"{k:<22} {v}")


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to create.")
@text_option
@click.option("--positions", type=int, default=None,
              help="Teacher-forced positions [default: two sliding windows plus a prefill chunk].")
@greedy_options
@reference_option
@image_options
@threads_option
@json_option
@error_boundary
def bundle(artifact, out, text, positions, new_tokens, prompt, reference, images, no_images, threads, as_json):
    """Write a golden bundle: inputs, reference outputs and an adb runner script for ARTIFACT."""
    from . import api

    plan = BundlePlan(_text(text), positions, new_tokens, prompt, reference=reference, threads=threads,
                      images=None if no_images else tuple(images))
    index = api.bundle(artifact, out, plan, _progress())
    if as_json:
        return _echo_json(index)
    calls = index["calls"]
    click.echo(f"{out}: golden bundle for {index['artifact']['format']} artifact {index['artifact']['name']}: "
               f"{index['positions']} positions in {calls['prefill']} prefill + {calls['decode']} decode calls, "
               f"{index['greedy']['new_tokens']} greedy tokens"
               + (f", {len(index['images']['prompts'])} image prompts" if "images" in index else "")
               + f"; run it with {out}/{index['runner']['script']} or gemma-export bundle-run")


@cli.command("bundle-run")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--artifact", required=True, type=click.Path(exists=True, file_okay=False),
              help="The artifact the bundle was made from.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Outputs folder to write.")
@click.option("--stock", "stock_runtime", is_flag=True,
              help="Generate with the runtime's own LLM API instead (the desktop twin of run_stock_on_device.sh).")
@threads_option
@error_boundary
def bundle_run(bundle_dir, artifact, out, stock_runtime, threads):
    """Produce a bundle's outputs with the desktop runtime, in the layout a device runner writes."""
    from . import api

    api.run_bundle(bundle_dir, artifact, out, threads, stock_runtime)
    click.echo(f"{out}: outputs of {artifact} on the desktop runtime; check them with "
               f"gemma-export verify --outputs {out}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a CI cancel sends) unwinds like Ctrl-C, so every cleanup on the way runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def main():
    quiet.silence()
    atexit.register(quiet.at_exit)
    signal.signal(signal.SIGTERM, _terminate)
    # past a file size limit, a write fails with EFBIG (reported as one line) instead of the
    # default SIGXFSZ killing the process with its staging folder behind it
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cli()
