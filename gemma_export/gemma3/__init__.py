"""The Gemma 3 model family: config and presets, the decoder, checkpoint names and chat format."""
