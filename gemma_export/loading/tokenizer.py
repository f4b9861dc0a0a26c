"""Gemma tokenizer: a Hugging Face `tokenizer.json` served by the `tokenizers` library."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import CheckpointError
from ..gemma3 import family

TOKENIZER_FILE = "tokenizer.json"
# parsed tokenizer.json files by content: a Gemma vocabulary is slow to parse next to hashing it,
# and verify opens the same tokenizer for an artifact, its reference and every copy of it
_PARSED: dict[str, object] = {}
_KEEP = 4


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: tokenizer file not found")
        raw = self.path.read_bytes()
        key = hashlib.sha256(raw).hexdigest()
        if key not in _PARSED:
            try:
                tok = _Tok.from_str(raw.decode("utf-8"))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise CheckpointError(f"{self.path}: not a valid tokenizer.json ({e})") from None
            while len(_PARSED) >= _KEEP:
                _PARSED.pop(next(iter(_PARSED)))
            _PARSED[key] = tok
        self._tok = _PARSED[key]
        ids = {role: self._id(token) for role, token in family.SPECIAL_TOKENS.items()}
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.start_of_turn_id, self.end_of_turn_id = ids["start_of_turn"], ids["end_of_turn"]
        self.stop_ids = tuple(self._id(token) for token in family.STOP_TOKENS)

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"{self.path}: tokenizer has no {token} token; not a Gemma tokenizer")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def chat(self, user_text: str) -> list[int]:
        """The Gemma chat format for one user turn, ending where the model's turn begins."""
        return self.encode(family.chat_text(user_text))
