"""Fixtures shared by the whole suite, each built once per session: the tiny model, the tiny
artifacts (by format, recipe and debug outputs), and the real 270M."""

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import CTX, TEXT, T, TINY

# `make test` runs two xdist workers on the 2-core machine: one torch thread each
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if WORKER else 2)


@pytest.fixture(scope="session")
def tiny():
    from gemma_export.gemma3.config import preset
    from gemma_export.loading.load import random_model

    return random_model(preset("tiny"), seed=0, max_context=CTX)


class Artifacts:
    """Tiny artifacts exported on first use and shared, across xdist workers too (the first to ask
    exports under a file lock, the others wait and reuse); tests that change one work on a copy."""

    def __init__(self, root: Path):
        self.root = root
        self._made = {}

    def get(self, fmt: str, recipe: str = "fp32", debug: bool = True, images: bool = False) -> Path:
        """The tiny artifact; with `images`, also its image entry points (tiny has a vision encoder)."""
        key = (fmt, recipe, debug, images)
        if key not in self._made:
            from filelock import FileLock

            from gemma_export import pipeline

            out = self.root / f"{fmt}-{recipe}-{'debug' if debug else 'release'}{'-images' if images else ''}"
            done = out.with_name(out.name + ".done")
            with FileLock(str(out) + ".lock"):
                if not done.is_file():
                    shutil.rmtree(out, ignore_errors=True)
                    pipeline.export(pipeline.ExportJob.single(TINY, fmt, out, recipe=recipe, prefill_len=T,
                                                              debug_outputs=debug, images=images))
                    done.touch()
            self._made[key] = out
        return self._made[key]

    def copy(self, fmt: str, dst: Path, recipe: str = "fp32", debug: bool = True, images: bool = False) -> Path:
        shutil.copytree(self.get(fmt, recipe, debug, images), dst)
        return dst


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    if WORKER:  # the workers' base temps are siblings: share one folder between them
        root = tmp_path_factory.getbasetemp().parent / "artifacts"
        root.mkdir(exist_ok=True)
        return Artifacts(root)
    return Artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def quantized_tiny(tiny):
    """The tiny model quantized in PyTorch by a recipe, with the tokenizer and calibration set an
    export uses (so its codes are the ones an artifact must hold)."""
    from gemma_export.loading import Tokenizer, load
    from gemma_export.quant.quantize import quantize_model

    made = {}

    def get(recipe: str):
        if recipe not in made:
            model = copy.deepcopy(tiny)
            quantize_model(model, recipe, Tokenizer(load(TINY).tokenizer_path))
            made[recipe] = model
        return made[recipe]

    return get


@pytest.fixture(scope="session")
def real():
    """The bundled real Gemma 3 270M (fp32, dequantized from the GGUF)."""
    from gemma_export.loading import ModelSpec, load

    return load(ModelSpec("gemma3-270m", max_context=2048))


@pytest.fixture(scope="session")
def tokenizer(real):
    from gemma_export.loading import Tokenizer

    return Tokenizer(real.tokenizer_path)


@pytest.fixture(scope="session")
def text_ids(tokenizer):
    return tokenizer.encode(TEXT.read_text())
