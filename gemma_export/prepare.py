"""`python -m gemma_export.prepare`: assemble the bundled real weights and tokenizer into the cache."""

from .loading import BUNDLED_PRESET, ModelSpec, bundled_gguf, load, tokenizer_for


def main() -> None:
    path = bundled_gguf()
    tok = tokenizer_for("gguf", path)
    load(ModelSpec(BUNDLED_PRESET))  # also writes the dequantized fp32 cache for fast loads
    print(f"bundled {BUNDLED_PRESET}: {path}\ntokenizer: {tok}")


if __name__ == "__main__":
    main()
