"""Loading: a model reference (preset, Hugging Face folder, GGUF file) -> a Gemma 3 module and its tokenizer."""

from .load import BUNDLED_PRESET, LoadedModel, ModelSpec, bundled_gguf, load, read_config, tokenizer_for
from .tokenizer import Tokenizer

__all__ = ["BUNDLED_PRESET", "LoadedModel", "ModelSpec", "Tokenizer", "bundled_gguf", "load", "read_config",
           "tokenizer_for"]
