"""Gemma tokenizer: a Hugging Face `tokenizer.json` served by the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: tokenizer file not found")
        try:
            self._tok = _Tok.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{self.path}: not a valid tokenizer.json ({e})") from None
        self.bos_id = self._id("<bos>")
        self.eos_id = self._id("<eos>")
        self.pad_id = self._id("<pad>")
        self.start_of_turn_id = self._id("<start_of_turn>")
        self.end_of_turn_id = self._id("<end_of_turn>")

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"{self.path}: tokenizer has no {token} token; not a Gemma tokenizer")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id, self.end_of_turn_id)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def chat(self, user_text: str) -> list[int]:
        """The Gemma chat format for one user turn, ending where the model's turn begins."""
        text = f"<start_of_turn>user\n{user_text}<end_of_turn>\n<start_of_turn>model\n"
        return [self.bos_id, *self._tok.encode(text, add_special_tokens=False).ids]
