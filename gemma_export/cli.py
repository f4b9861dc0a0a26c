"""The `gemma-export` command line: a thin layer over the library.

Heavy packages (torch, exporters, runtimes) are imported inside commands, so `--help` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from .errors import ExportError


def error_boundary(fn):
    """Typed errors become one line and an exit code; nothing else escapes as a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ExportError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            sys.exit(130)
        except click.exceptions.ClickException:
            raise
        except Exception as e:  # an internal bug: still one line, traceback on request
            if os.environ.get("GEMMA_EXPORT_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(
                f"Error: internal error: {type(e).__name__}: {msg} (set GEMMA_EXPORT_DEBUG=1 for a traceback)",
                err=True,
            )
            sys.exit(1)

    return wrapper


def parse_formats(value: str) -> tuple[str, ...]:
    """`onnx`, `onnx,pte` or `all` -> the formats, in the order given."""
    from converters import FORMATS  # the format table only: imports no backend

    names = tuple(FORMATS) if value.strip() == "all" else tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise click.BadParameter(f"{', '.join(bad) or repr(value)} is not a format; choose from "
                                 f"{', '.join(FORMATS)} (comma-separated) or all")
    if len(set(names)) < len(names):
        raise click.BadParameter(f"a format is named twice in {value!r}")
    return names


def model_options(fn):
    fn = click.option("--random-weights", is_flag=True, help="Seeded random weights at full size (no checkpoint).")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-weights.")(fn)
    return fn


def runtime_options(fn):
    fn = click.option("--max-context", type=int, default=None, help="Longest sequence the KV cache holds [default: 4096, or the model's limit if smaller].")(fn)
    fn = click.option("--prefill-len", type=int, default=128, show_default=True,
                      help="Tokens per prefill chunk (static shape).")(fn)
    fn = click.option("--threads", type=int, default=2, show_default=True, help="CPU threads.")(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gemma-export")
def cli():
    """Export Gemma 3 to on-device formats and prove the artifacts match PyTorch.

    MODEL is a preset name (see `gemma-export models`), a Hugging Face checkpoint folder,
    a .gguf file, or an exported artifact folder.
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@error_boundary
def models(as_json):
    """List the model presets."""
    from .config import PRESETS
    from .loading import BUNDLED_PRESET

    rows = []
    for name, cfg in PRESETS.items():
        rows.append({
            "name": name, "parameters": cfg.param_counts()["total"], "layers": cfg.num_layers,
            "window": cfg.sliding_window, "max_context": cfg.max_position_embeddings,
            "weights": "bundled (real, GGUF Q4_K_M)" if name == BUNDLED_PRESET else "--random-weights or a checkpoint",
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:<12} {r['parameters'] / 1e6:>9,.1f}M params  {r['layers']:>2} layers  "
                   f"window {r['window']:>4}  context {r['max_context']:>7,}  weights: {r['weights']}")


@cli.command()
@click.argument("model")
@model_options
@click.option("--context", type=int, default=None, help="Context length for the KV cache figures (default: model max).")
@click.option("--kv-dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8"]), default="float32",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@error_boundary
def inspect(model, random_weights, seed, context, kv_dtype, as_json):
    """Print a model's config, parameter counts and memory figures."""
    from .api import read_config
    from .errors import ConfigError
    from .inspect import format_report, report

    cfg = read_config(model)
    ctx = context or cfg.max_position_embeddings
    if ctx < 1:
        raise ConfigError(f"--context must be positive, got {ctx}")
    r = report(cfg, ctx, kv_dtype)
    click.echo(json.dumps(r, indent=2) if as_json else format_report(r))


@cli.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the Gemma chat format.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@model_options
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (token ids, text, timings) at the end.")
@error_boundary
def generate(model, prompt, chat, max_new_tokens, temperature, top_k, random_weights, seed,
             max_context, prefill_len, threads, as_json):
    """Stream generated text from a PyTorch model or an exported artifact."""
    import time

    from .api import open_session
    from .session import Sampling
    from .session import generate as run

    opened = open_session(model, random_weights=random_weights, seed=seed, max_context=max_context,
                          prefill_len=prefill_len, threads=threads)
    tok = opened.tokenizer
    ids = tok.chat(prompt) if chat else tok.encode(prompt)
    sampling = Sampling(temperature=temperature, top_k=top_k, seed=seed)
    out, shown = [], ""
    start = time.perf_counter()
    first = None
    for token in run(opened.session, ids, max_new_tokens, tok.stop_ids, sampling):
        first = first or time.perf_counter()
        out.append(token)
        if token in tok.stop_ids:
            break
        if not as_json:
            text = tok.decode(out)
            click.echo(text[len(shown):], nl=False)
            shown = text
    end = time.perf_counter()
    if as_json:
        click.echo(json.dumps({
            "prompt_tokens": len(ids), "tokens": out, "text": tok.decode([t for t in out if t not in tok.stop_ids]),
            "time_to_first_token_s": (first or end) - start, "total_s": end - start,
        }))
    else:
        click.echo()


@cli.command()
@click.argument("model")
@click.option("--format", "fmt", required=True, callback=lambda ctx, param, v: parse_formats(v),
              help="Artifact format: pte, onnx or tflite; several comma-separated, or all (quantized and "
                   "calibrated once, one artifact per format under --out).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Artifact folder to create (several formats: a build folder holding OUT/FORMAT).")
@click.option("--recipe", default="fp32", show_default=True, help="Quantization recipe.")
@click.option("--force", is_flag=True, help="Replace an existing artifact folder.")
@click.option("--debug-outputs/--no-debug-outputs", default=True, show_default=True,
              help="Include the per-layer hidden-state entry point that `verify --locate` uses.")
@model_options
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON when done.")
@error_boundary
def export(model, fmt, out, recipe, force, debug_outputs, random_weights, seed, max_context, prefill_len, threads,
           as_json):
    """Export MODEL to an artifact folder (model file, tokenizer, manifest.json)."""
    import time
    from pathlib import Path

    import torch

    from .api import read_config
    from .loading import ModelSpec
    from .model import DEFAULT_CONTEXT
    from .package import ExportRequest
    from .package import export_formats

    torch.set_num_threads(threads)
    ctx = max_context or min(DEFAULT_CONTEXT, read_config(model).max_position_embeddings)
    requests = [ExportRequest(format=f, prefill_len=prefill_len, max_context=ctx, recipe=recipe,
                              debug_outputs=debug_outputs) for f in fmt]
    outs = [Path(out)] if len(fmt) == 1 else [Path(out) / f for f in fmt]
    spec = ModelSpec(model, random_weights=random_weights, seed=seed, max_context=ctx)
    start = time.perf_counter()

    def progress(msg):
        rss, peak = memory_gib()
        click.echo(f"[{time.perf_counter() - start:7.1f}s rss {rss:5.1f} GiB peak {peak:5.1f} GiB] {msg}", err=True)

    manifests = export_formats(spec, requests, outs, force=force, progress=progress)
    if as_json:  # one format: its manifest; several: a list of them, in --format order
        click.echo(json.dumps(manifests[0] if len(fmt) == 1 else manifests, indent=2))
        return
    for path, manifest in zip(outs, manifests):
        size = sum(f["bytes"] for f in manifest["files"].values())
        click.echo(f"{path}: {manifest['format']} artifact, {size / 2**20:,.1f} MiB, "
                   f"{len(manifest['files'])} files, exported in {manifest['export_seconds']} s")
    if len(fmt) > 1:
        click.echo(f"check them all: gemma-export verify --all {out}")


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--all", "all_", is_flag=True, help="ARTIFACT is a build folder: verify every artifact in it, and "
              "compare the artifacts with each other.")
@click.option("--reference", default=None, help="PyTorch model to compare with [default: the model the artifact came from].")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text to teacher-force [default: the bundled held-out English text].")
@click.option("--positions", type=int, default=1300, show_default=True, help="Teacher-forced positions.")
@click.option("--new-tokens", type=int, default=32, show_default=True, help="Greedy tokens to compare.")
@click.option("--prompt", default="The capital of France is", show_default=True, help="Prompt for the greedy run.")
@click.option("--min-top1", type=float, default=None, help="Override the recipe's top-1 threshold.")
@click.option("--max-mean-kl", type=float, default=None, help="Override the recipe's mean-KL threshold.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON here.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.md and parity.png into this folder.")
@click.option("--outputs", "outputs_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Check outputs produced by a bundle runner (phone, simulator, desktop) instead of running.")
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="The golden bundle the --outputs came from [default: the one named in the outputs' index.json].")
@click.option("--locate", is_flag=True, help="Also name the first decoder layer whose hidden state diverges.")
@click.option("--locate-threshold", type=float, default=None,
              help="Relative error that counts as diverging for --locate [default: 0.01].")
@click.option("--threads", type=int, default=2, show_default=True)
@error_boundary
def verify(artifact, all_, reference, text, positions, new_tokens, prompt, min_top1, max_mean_kl, json_path,
           report_dir, outputs_dir, bundle_dir, locate, locate_threshold, threads):
    """Check an artifact against the PyTorch reference (exit 0 pass, 3 parity failure, 1 error)."""
    from pathlib import Path

    from .errors import ArtifactError, ParityError

    overrides = {k: v for k, v in (("min_top1", min_top1), ("max_mean_kl", max_mean_kl)) if v is not None}
    if outputs_dir:
        from .bundle import check_outputs, outputs_lines

        checked = check_outputs(outputs_dir, bundle_dir, artifact, overrides)
        _write_json(json_path, checked)
        for line in outputs_lines(checked):
            click.echo(line)
        if checked["failures"]:
            raise ParityError(f"{outputs_dir}: parity FAILED against bundle {checked['bundle']}: "
                              + "; ".join(checked["failures"]))
        click.echo(f"PASS {outputs_dir} against bundle {checked['bundle']} ({checked['format']})")
        return
    if not artifact:
        raise click.UsageError("give an ARTIFACT (or a build folder with --all, or --outputs DIR)")
    from .report import VerifyPlan, build_json, build_table, summary_lines, verify_artifact, verify_build
    from .report import write_build_report, write_report

    plan = VerifyPlan(Path(text) if text else default_eval_text(), positions, new_tokens, prompt, reference,
                      overrides, threads, locate, locate_threshold)
    if all_:
        build = verify_build(artifact, plan)
        _write_json(json_path, build_json(build))
        if report_dir:
            write_build_report(report_dir, build)
        click.echo(build_table(build))
        errors = [r["artifact"] for r in build["artifacts"] if "error" in r]
        failed = [r["artifact"] for r in build["artifacts"] if "error" not in r and not r["pass"]]
        if errors:
            raise ArtifactError(f"{len(errors)} artifact(s) could not be verified: {', '.join(errors)}")
        if failed:
            raise ParityError(f"parity FAILED for {len(failed)} of {len(build['artifacts'])} artifacts: "
                              + ", ".join(failed))
        click.echo(f"PASS all {len(build['artifacts'])} artifacts in {artifact}")
        return
    verified = verify_artifact(artifact, plan)
    report = verified.report
    _write_json(json_path, report)
    if report_dir:
        write_report(report_dir, verified)
    for line in summary_lines(report):
        click.echo(line)
    if "locate" in report:
        from .report import locate_lines

        for line in locate_lines(report["locate"]):
            click.echo(line)
    if report["failures"]:
        raise ParityError(f"{artifact}: parity FAILED: " + "; ".join(report["failures"]))
    click.echo(f"PASS {artifact} ({report['format']}) against {report['reference']}")


def _write_json(path, data) -> None:
    if path:
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@error_boundary
def recipes(as_json):
    """List the quantization recipes (presets; a .toml file works wherever a name does)."""
    from converters import FORMATS, supported_presets

    from .recipes import PRESETS

    formats = {f: supported_presets(f) for f in FORMATS}
    if as_json:
        click.echo(json.dumps([{**r.to_dict(), "formats": [f for f in FORMATS if r.name in formats[f]]}
                               for r in PRESETS.values()], indent=2))
        return
    for r in PRESETS.values():
        where = ",".join(f for f in FORMATS if r.name in formats[f]) or "-"
        click.echo(f"{r.name:<14} {where:<16} {r.description}")


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
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results as JSON here.")
@error_boundary
def evaluate(model, text, positions, recipe, reference, no_reference, random_weights, seed, max_context,
             prefill_len, threads, json_path):
    """Perplexity of MODEL (PyTorch or artifact) on a text, and KL / top-1 agreement against fp32."""
    from pathlib import Path

    from .api import is_artifact, open_session
    from .package import read_manifest
    from .verify import perplexity_of, reference_for, teacher_forced

    progress = lambda m: click.echo(m, err=True)  # noqa: E731
    test = open_session(model, random_weights=random_weights, seed=seed, max_context=max_context,
                        prefill_len=prefill_len, threads=threads, recipe=recipe, progress=progress)
    text_path = Path(text) if text else default_eval_text()
    ids = test.tokenizer.encode(text_path.read_text())[:positions]
    result = {"model": test.description, "text": str(text_path), "positions": len(ids)}
    if no_reference:
        result["perplexity"] = perplexity_of(test.session, ids)
    else:
        if is_artifact(model):  # quality is judged against the fp32 model the artifact came from
            manifest = read_manifest(model)
            ref = reference_for({**manifest, "recipe": {"name": "fp32"}}, reference, threads)
        else:
            ref = open_session(reference or model, random_weights=random_weights, seed=seed,
                               max_context=test.session.info.max_context, prefill_len=prefill_len, threads=threads)
        s = teacher_forced(ref.session, test.session, ids).summary()
        result.update({"reference": ref.description, "perplexity": s["perplexity_test"],
                       "perplexity_reference": s["perplexity_reference"],
                       "perplexity_change": s["perplexity_test"] / s["perplexity_reference"] - 1,
                       "mean_kl": s["mean_kl"], "top1_agreement": s["top1_agreement"],
                       "top5_overlap": s["top5_overlap"]})
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        click.echo(f"{k:<22} {v:.6g}" if isinstance(v, float) else f"{k:<22} {v}")


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to create.")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text to teacher-force [default: the bundled held-out English text].")
@click.option("--positions", type=int, default=None,
              help="Teacher-forced positions [default: two sliding windows plus a prefill chunk].")
@click.option("--new-tokens", type=int, default=32, show_default=True, help="Greedy tokens.")
@click.option("--prompt", default="The capital of France is", show_default=True, help="Prompt for the greedy run.")
@click.option("--reference", default=None, help="PyTorch model for the reference outputs [default: the artifact's].")
@click.option("--threads", type=int, default=2, show_default=True)
@error_boundary
def bundle(artifact, out, text, positions, new_tokens, prompt, reference, threads):
    """Write a golden bundle: inputs, reference outputs and an adb runner script for ARTIFACT."""
    import time
    from pathlib import Path

    from .bundle import BundlePlan, make_bundle

    plan = BundlePlan(Path(text) if text else default_eval_text(), positions, new_tokens, prompt,
                      reference=reference, threads=threads)
    start = time.perf_counter()

    def progress(msg):
        click.echo(f"[{time.perf_counter() - start:7.1f}s] {msg}", err=True)

    index = make_bundle(artifact, out, plan, progress)
    calls = index["calls"]
    click.echo(f"{out}: golden bundle for {index['artifact']['format']} artifact {index['artifact']['name']}: "
               f"{index['positions']} positions in {calls['prefill']} prefill + {calls['decode']} decode calls, "
               f"{index['greedy']['new_tokens']} greedy tokens; run it with {out}/{index['runner']['script']} "
               f"or gemma-export bundle-run")


@cli.command("bundle-run")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--artifact", required=True, type=click.Path(exists=True, file_okay=False),
              help="The artifact the bundle was made from.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Outputs folder to write.")
@click.option("--threads", type=int, default=2, show_default=True)
@error_boundary
def bundle_run(bundle_dir, artifact, out, threads):
    """Produce a bundle's outputs with the desktop runtime, in the layout a device runner writes."""
    from .bundle import run_bundle

    run_bundle(bundle_dir, artifact, out, threads)
    click.echo(f"{out}: outputs of {artifact} on the desktop runtime; check them with "
               f"gemma-export verify --outputs {out}")


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


def default_eval_text():
    import calibration

    return calibration.DATA / "eval-en-maintguide.txt"


def main():
    cli()
