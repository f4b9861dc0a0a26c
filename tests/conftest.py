import pytest
import torch

torch.set_num_threads(2)

TEXT = __import__("pathlib").Path(__file__).parent / "data" / "gpl-3.txt"


@pytest.fixture(scope="session")
def tiny():
    from gemma_export.config import preset
    from gemma_export.loading import random_model

    return random_model(preset("tiny"), seed=0, max_context=256)


@pytest.fixture(scope="session")
def real():
    """The bundled real Gemma 3 270M (fp32, dequantized from the GGUF)."""
    from gemma_export.loading import ModelSpec, load

    return load(ModelSpec("gemma3-270m", max_context=2048))


@pytest.fixture(scope="session")
def tokenizer(real):
    from gemma_export.tokenizer import Tokenizer

    return Tokenizer(real.tokenizer_path)


@pytest.fixture(scope="session")
def text_ids(tokenizer):
    return tokenizer.encode(TEXT.read_text())
